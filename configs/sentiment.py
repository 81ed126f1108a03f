"""Bi-LSTM sentiment classification on IMDB (recipes.sentiment).

Default (the real recipe):
    python -m recipes.sentiment --workdir=runs/sentiment
should reach 88 % test accuracy (docs/recipes/sentiment.md: results, with training times).

Variant `zh`: Chinese product reviews (TFDS `chinese_reviews`), every character a token, plus
their 2- and 3-grams:
    python -m recipes.sentiment --workdir=runs/sentiment_zh --config=configs/sentiment.py:zh
should reach 84.5 % test accuracy.

Variant `pretrained`: the same model (128 units), its words, embedding and forward LSTM
from a language model trained on IMDB's text first (configs/language_model.py:imdb):
    python -m recipes.sentiment --workdir=runs/sentiment_pretrained \
        --config=configs/sentiment.py:pretrained --config.init_from=runs/lm_imdb
and its backward LSTM from a backward language model (configs/language_model.py:imdb_backward)
with `--config.init_backward_from=runs/lm_imdb_backward`.

Variants `ngrams` and `zh_ngrams`: no LSTM, a logistic regression on the hashed token 1- and
2-grams (characters: 1- to 3-grams); averaged with a Bi-LSTM run by
`python -m recipes.sentiment ensemble` (docs/recipes/sentiment.md):
    python -m recipes.sentiment --workdir=runs/sentiment_ngrams --config=configs/sentiment.py:ngrams

Variants `smoke` and `zh_smoke` (tests and CI: tiny data and model):
    python -m recipes.sentiment --workdir=/tmp/smoke --config=configs/sentiment.py:smoke
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Data: any TFDS text-classification dataset with a string and a 0/1 label.
    config.dataset = "imdb_reviews"
    config.text_feature = "text"
    config.label_feature = "label"
    config.train_split = "train[:90%]"
    config.validation_split = "train[90%:]"  # carved from train
    config.test_split = "test"  # used only for the final evaluation
    config.data_dir = ""  # empty: TFDS_DATA_DIR, else TFDS's default
    config.download = True  # let TFDS download data that is not prepared
    # Text -> tokens.
    config.split = "whitespace"  # "whitespace" (words) or "character" (text without spaces)
    config.ngrams = 1  # > 1: also the token n-grams up to this length (TextVectorization)
    config.vocab_size = 10000  # (more words overfit more)
    config.max_length = 500  # tokens kept from the start of each review
    config.bucket_width = 50  # batches hold reviews of similar length
    # Model: "bilstm"; "ngrams": a logistic regression on the hashed token n-grams (1 to
    # bag_ngrams tokens, bag_buckets weights; no embedding or LSTM); or
    # "bilstm_ngrams": the two in one model, their scores added, the n-gram weights learning
    # at ngrams_lr_scale x the learning rate.
    config.model = "bilstm"
    config.bag_ngrams = 3
    config.bag_buckets = 2**20
    config.ngrams_lr_scale = 10.0
    config.embedding_dim = 128
    config.lstm_units = 64
    config.num_layers = 1
    config.word_dropout = 0.25  # fraction of tokens whose whole embedding is dropped
    config.dropout = 0.3  # on embeddings and pooled features
    config.lstm_dropout = 0.0  # variational dropout on the LSTM inputs
    # Training.
    config.batch_size = 64
    config.epochs = 4
    config.learning_rate = 1e-3
    # "constant", or "cosine": from learning_rate down to 0 over the run's steps (cosine decay).
    config.lr_schedule = "constant"
    config.clipnorm = 1.0
    # The Keras dtype policy of training: "float32", or "mixed_bfloat16" (float32 weights,
    # bfloat16 matmuls; faster on CPUs with bfloat16 matrix units, AMX: docs/benchmarks.md).
    # The export is float32 either way.
    config.dtype_policy = "float32"
    config.early_stopping_patience = 0  # 0: off
    # A language model's workdir (configs/language_model.py:imdb): its vocabulary, embedding
    # and LSTM start this model (recipes/sentiment/pretrained.py). Empty: random start.
    config.init_from = ""
    # With init_from: a backward language model's workdir (configs/language_model.py:
    # imdb_backward, on init_from's embedding): it starts the backward LSTM. Empty: random.
    config.init_backward_from = ""
    # With init_from: the learning rate of the language models' weights (embedding, forward
    # LSTM; the backward one with init_backward_from) is learning_rate * pretrained_lr_scale
    # (discriminative rates; 1: one rate).
    config.pretrained_lr_scale = 1.0
    config.shuffle_buffer = 25000
    # Adversarial training on the embeddings (Miyato et al. 2017; recipes/sentiment/
    # adversarial.py, docs/recipes/sentiment.md). normalize_embeddings: the embedding's rows
    # normalized by their frequency-weighted mean and variance (in the exported model too).
    config.normalize_embeddings = False
    # > 0: the loss also on the embedding outputs moved by this norm per review along the
    # loss gradient, times adversarial_weight (0: off).
    config.adversarial_epsilon = 0.0
    config.adversarial_weight = 1.0
    # > 0: plus KL(p(clean) || p(moved by this norm the way p changes most)), one power
    # iteration from a random direction of norm virtual_adversarial_xi, times
    # virtual_adversarial_weight, on the labelled batch and a batch of unlabeled_split
    # (needs no labels; '': the labelled batch alone) (0: off).
    config.virtual_adversarial_epsilon = 0.0
    config.virtual_adversarial_weight = 1.0
    config.virtual_adversarial_xi = 0.1
    config.unlabeled_split = "unsupervised"  # IMDB's 50,000 unlabelled reviews
    # True: train on full batches only (each bucket's last, partial batch is dropped; else
    # it is filled up with empty rows of weight 0).
    # Under a multi-replica strategy, replicas then get equal shares of every batch, and
    # training matches one device up to rounding (replicas average their mean losses).
    config.drop_remainder = False
    config.log_every_steps = 50  # TensorBoard step scalars (0: off)
    # Serving (the SavedModel export, recipes/sentiment/serving.py): fold the embedding into
    # the Bi-LSTM's input projections, a table of vocab_size x 4*lstm_units floats per
    # direction (faster: docs/deploy.md); False: computed per request, a smaller export.
    config.fold_embedding = True
    # Deployment (`export`): training reviews calibrating the full-integer (int8) model.
    config.calibration_reviews = 1000
    # Texts whose gates and token influences TensorBoard shows every epoch (`explain`).
    config.explain_texts = ("A wonderful, moving film.", "Dull, and far too long.")
    config.seed = 0

    if arg in ("zh", "zh_smoke", "zh_ngrams"):
        config.dataset = "chinese_reviews"
        config.split = "character"
        config.ngrams = 3  # characters, then their 2- and 3-grams (Chinese words: 1-3 characters)
        config.vocab_size = 40000  # 4,428 characters in the training split, plus n-grams
        config.max_length = 900  # 3 x 300 characters (98 % of the reviews are shorter)
        config.bucket_width = 25
        config.embedding_dim = 64
        config.dropout = 0.5
        config.word_dropout = 0.4
        config.lstm_dropout = 0.2
        config.learning_rate = 5e-4
        config.epochs = 8  # the checkpoint with the best validation loss is kept
        config.explain_texts = ("我爱中国", "这本书非常好，我很喜欢", "质量太差了，非常失望")
        config.unlabeled_split = ""  # (chinese_reviews has none)
    if arg == "pretrained":
        # Started from the language model of configs/language_model.py:imdb
        # (docs/recipes/sentiment.md):
        #   python -m recipes.language_model --workdir=runs/lm_imdb \
        #       --config=configs/language_model.py:imdb
        config.init_from = "runs/lm_imdb"
        config.lstm_units = 128  # the language model's sizes
        config.embedding_dim = 128
    if arg in ("ngrams", "zh_ngrams"):
        config.model = "ngrams"
        config.learning_rate = 1e-2  # (2e-3: still learning after 10 epochs)
        config.epochs = 10
    if arg == "ngrams":
        config.bag_ngrams = 2  # (3: no better on test)
        config.vocab_size = 100000  # words; the rest are one unknown token
        config.max_length = 2500  # whole reviews (the longest has 2,505 words)
    if arg == "zh_ngrams":
        config.ngrams = 1  # characters; the model hashes their 2- and 3-grams itself
        config.bag_ngrams = 3
        config.vocab_size = 10000
        config.max_length = 1000
    if arg in ("smoke", "zh_smoke"):
        config.log_every_steps = 5
        config.train_split = "train[:512]"
        config.validation_split = "train[-128:]"
        config.test_split = "test[:256]"
        config.vocab_size = 2000
        config.max_length = 64
        config.bucket_width = 16
        config.embedding_dim = 16
        config.lstm_units = 8
        config.batch_size = 32
        config.epochs = 2
        config.learning_rate = 1e-3
        config.shuffle_buffer = 512
        config.calibration_reviews = 64
        config.unlabeled_split = "unsupervised[:512]" if arg == "smoke" else ""
    if arg == "zh_smoke":
        config.ngrams = 1
        config.train_split = "train[:768]"
        config.vocab_size = 1000
        config.shuffle_buffer = 768
    elif arg not in (None, "", "smoke", "zh", "pretrained", "ngrams", "zh_ngrams"):
        raise ValueError(f"unknown variant {arg!r} of configs/sentiment.py "
                         "(known: smoke, zh, zh_smoke, pretrained, ngrams, zh_ngrams)")
    return config
