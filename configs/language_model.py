"""LSTM language models (recipes.language_model).

Variants (`--config=configs/language_model.py:VARIANT`):
- `shakespeare` (default): character level, TFDS `tiny_shakespeare`.
- `ptb_small`, `ptb_medium`: word-level Penn Treebank, the "small" and "medium"
  configurations of Zaremba, Sutskever & Vinyals (2014), read from Mikolov's
  `ptb.{train,valid,test}.txt` in `--config.text_dir`.
- `imdb`: word-level IMDB reviews (`train` without the sentiment recipe's validation part,
  plus `unsupervised`; never `test`), tokenized as the sentiment recipe tokenizes: the
  pretraining of `configs/sentiment.py:pretrained` (`--config.init_from`).
- `imdb_backward`: the same text read backwards, with `imdb`'s vocabulary and embedding
  (kept fixed): the pretraining of the sentiment model's backward LSTM
  (`--config.init_backward_from`).
- `smoke`, `imdb_smoke`: tiny runs for tests (seconds).
docs/recipes/language_model.md gives the results of those that were run, with their commands.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("shakespeare", "ptb_small", "ptb_medium", "imdb", "imdb_backward", "smoke",
            "imdb_smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "shakespeare"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/language_model.py "
                         f"(known: {', '.join(VARIANTS)})")
    config = ml_collections.ConfigDict()
    # Data: a TFDS dataset with a text feature, or (dataset="") plain-text files
    # text_dir/text_files.format(split=...) with one sentence per line.
    config.level = "char"  # "char" or "word"
    config.dataset = "tiny_shakespeare"
    config.text_feature = "text"
    config.data_dir = ""  # empty: TFDS_DATA_DIR, else TFDS's default
    config.download = True  # let TFDS download data that is not prepared
    config.text_dir = ""
    config.text_files = "ptb.{split}.txt"
    config.train_split = "train"
    config.validation_split = "validation"
    config.test_split = "test"  # empty: none
    config.max_chars = 0  # > 0: keep only the first max_chars characters of each split
    config.reverse = False  # True: every split read backwards, token by token (a backward LM)
    config.standardize = ""  # "sentiment": words as the sentiment recipe's tokens
    config.vocab_size = 0  # 0: every token of the training split, plus the unknown token
    config.unknown_token = "\ufffd"  # id 0: tokens not in the vocabulary
    config.start_token = "\n"  # what scoring and generation start from
    # A finished language model's workdir: its vocabulary and embedding, kept fixed here (a
    # backward LM whose LSTM can read the same embedding as that forward LM's). Empty: none.
    config.embedding_from = ""
    # Model: Embedding -> num_layers x LSTM(units) -> Dense(vocab), dropout between.
    config.embedding_dim = 128
    config.units = 512
    config.num_layers = 2
    config.dropout = 0.25
    config.init_scale = 0.1  # all weights ~ U[-init_scale, init_scale]
    # Truncated BPTT: batch_size parallel streams, num_steps tokens per batch.
    config.batch_size = 64
    config.num_steps = 100
    config.epochs = 30
    config.optimizer = "adam"  # "sgd" or "adam"
    config.learning_rate = 2e-3
    config.lr_decay = 0.9  # lr = learning_rate * lr_decay ** max(epoch - decay_after, 0)
    config.decay_after = 10
    config.clipnorm = 100.0  # on the global norm of the gradient of the per-sequence loss
    # Evaluation and samples.
    config.score_chunk = 256  # time steps per chunk when scoring a whole split
    # The per-epoch validation cuts the split at line ends into eval_rows pieces scored
    # side by side, each from the start state; the final numbers score it as one stream.
    config.eval_rows = 16
    config.sample_prompt = "ROMEO:"
    config.sample_tokens = 300  # per epoch, to TensorBoard (0: none)
    config.sample_temperature = 0.8
    config.log_every_steps = 100  # TensorBoard step scalars (0: off)
    config.seed = 0

    if variant.startswith("ptb"):
        config.level = "word"
        config.dataset = ""
        config.text_dir = "../shared/data/ptb"
        config.train_split, config.validation_split, config.test_split = (
            "train", "valid", "test")
        config.vocab_size = 10000
        config.unknown_token = "<unk>"
        config.start_token = "<eos>"
        config.sample_prompt = "the company said"
        config.sample_tokens = 50
        config.optimizer = "sgd"
        config.learning_rate = 1.0
        config.clipnorm = 5.0
        config.eval_rows = 1  # per-epoch validation as one stream too (the split is small)
    if variant == "ptb_small":
        config.embedding_dim = config.units = 200
        config.dropout = 0.0
        config.batch_size, config.num_steps = 20, 20
        config.epochs, config.decay_after, config.lr_decay = 13, 4, 0.5
    elif variant == "ptb_medium":
        config.embedding_dim = config.units = 650
        config.dropout = 0.5
        config.init_scale = 0.05
        config.batch_size, config.num_steps = 20, 35
        config.epochs, config.decay_after, config.lr_decay = 39, 6, 0.8
    elif variant.startswith("imdb"):
        config.level = "word"
        config.standardize = "sentiment"
        config.dataset = "imdb_reviews"
        # The sentiment recipe validates on train[90%:]: its model selection stays clean.
        config.train_split = "train[:90%]+unsupervised"
        config.validation_split = "train[90%:]"
        config.test_split = ""
        config.vocab_size = 10000
        config.unknown_token = "<unk>"  # (no review has it: standardization drops "<", ">")
        config.start_token = "<eos>"  # a line end between reviews
        config.embedding_dim = config.units = 128  # configs/sentiment.py:pretrained's sizes
        config.num_layers = 1
        config.dropout = 0.1
        config.batch_size, config.num_steps = 64, 70
        config.epochs = 8
        config.decay_after = 8
        config.sample_prompt = "this movie"
        config.sample_tokens = 50
    if variant == "imdb_backward":
        config.reverse = True
        config.embedding_from = "runs/lm_imdb"
        config.epochs = 1
        config.sample_prompt = "movie this"  # (read backwards: "this movie")
    if variant == "imdb_smoke":
        config.train_split = "train[:200]"
        config.validation_split = "train[-64:]"
        config.vocab_size = 2000  # configs/sentiment.py:smoke's sizes
        config.embedding_dim, config.units = 16, 8
        config.batch_size, config.num_steps = 8, 32
        config.epochs = 1
        config.sample_tokens = 10
        config.log_every_steps = 5
    elif variant == "smoke":
        config.log_every_steps = 5
        config.max_chars = 20000  # (each tiny_shakespeare split is one example)
        config.embedding_dim = 16
        config.units = 32
        config.batch_size, config.num_steps = 8, 32
        config.epochs = 2
        config.sample_tokens = 20
    return config
