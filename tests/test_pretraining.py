"""Sentiment from a language model: the IMDB LM's words, and `--config.init_from`."""

import shutil
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from recipe_testing import ROOT, parse_config, wait_until

from configs import language_model as lm_config
from configs import sentiment as sentiment_config
from recipes.common import data
from recipes.common.errors import RecipeError
from recipes.language_model import deploy as lm_deploy
from recipes.language_model import input_pipeline as lm_input
from recipes.language_model import train as lm_train
from recipes.sentiment import deploy as sentiment_deploy
from recipes.sentiment import input_pipeline, pretrained, train
from recipes.sentiment import model as models
from recipes.sentiment.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def lm_imdb_run(tmp_path_factory):
    """A finished `configs/language_model.py:imdb_smoke` workdir."""
    config = lm_config.get_config("imdb_smoke")
    workdir = tmp_path_factory.mktemp("language_model_imdb_smoke")
    lm_train.train_and_evaluate(config, str(workdir))
    return workdir


def _sentiment_config(lm_run, **overrides):
    config = sentiment_config.get_config("smoke")
    config.init_from = str(lm_run)
    config.update(overrides)
    return config


def test_language_model_words_are_the_sentiment_recipes_tokens():
    """The LM's stream of a few reviews = each review's tokens (the sentiment recipe's
    plain-Python tokenizer), a line end (`<eos>`) between two reviews."""
    (reviews,) = data.load_tfds("imdb_reviews", ["train[:30]"], None)
    texts = [ex["text"].numpy().decode("utf-8") for ex in reviews]
    config = lm_config.get_config("imdb")
    stream = lm_input.tokenize(tf.constant(["\n".join(texts)]), config.level,
                               config.standardize)[0].numpy()
    reference = Tokenizer([], max_length=10**6)
    expected = []
    for text in texts:
        expected += reference.tokens(text) + ["<eos>"]
    assert [t.decode("utf-8") for t in stream] == expected[:-1]
    assert any("<br" in text for text in texts)  # (what standardization removes is there)


def test_imdb_language_model_has_no_test_split(lm_imdb_run):
    config = lm_config.get_config("imdb_smoke")
    train_text, val_text, test_text = lm_input.read_splits(config)
    assert test_text is None and not config.test_split
    assert train_text.count("\n") == 199  # 200 reviews, one line end between two
    metrics = (lm_imdb_run / "metrics.json").read_text()
    assert '"test"' not in metrics and '"validation"' in metrics


def test_init_from_copies_the_language_models_words_and_lstm(lm_imdb_run, tmp_path):
    config = _sentiment_config(lm_imdb_run)
    _, lm_cfg, lm_vocab = pretrained.language_model(config)
    vocab = pretrained.vocabulary(lm_vocab, config.vocab_size)
    assert "<eos>" in lm_vocab and "<eos>" not in vocab
    assert vocab == [t for t in lm_vocab if t != "<eos>"][:config.vocab_size - 2]
    (train_raw,) = input_pipeline.load_texts(config, ["train[:8]"])
    vectorizer = input_pipeline.make_vectorizer(
        config, train_raw, tmp_path / "vocab.txt", vocab)
    model = models.create_model(config)
    embedding_layer, bidirectional = models.first_layers(model)
    backward_before = bidirectional.backward_layer.get_weights()
    pretrained.initialize(model, config, vectorizer.get_vocabulary()[2:])

    lm = lm_deploy.trained_step_model(lm_cfg, lm_vocab, lm_imdb_run)
    lm_lookup = lm_input.make_lookup(lm_cfg, lm_vocab)
    words = ["the", "movie", "bad", vocab[-1], "qwertyuiop"]  # the last: unknown to both
    (embedding,) = embedding_layer.get_weights()
    (lm_embedding,) = lm.get_layer("embedding").get_weights()
    ours = embedding[vectorizer(tf.constant(words)).flat_values.numpy()]
    theirs = lm_embedding[lm_lookup(tf.constant(words)).numpy()]
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(embedding[0], 0.0)  # padding
    for ours, theirs in zip(bidirectional.forward_layer.get_weights(),
                            lm.get_layer("lstm0").get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    for ours, before in zip(bidirectional.backward_layer.get_weights(), backward_before,
                            strict=True):
        np.testing.assert_array_equal(ours, before)  # the backward LSTM: not pretrained


def test_fine_tuning_starts_from_the_language_model_and_resumes_without_it(lm_imdb_run,
                                                                           tmp_path):
    """A run killed (-9) after its first epoch and rerun, at a learning rate of ~0 (its
    weights stay where they started; discriminative rates on): it resumes from its backup,
    which the language model's removal shows (a run from the start needs it), and ends with
    the language model's vocabulary, embedding and forward LSTM."""
    lm, workdir = tmp_path / "lm", tmp_path / "run"
    shutil.copytree(lm_imdb_run, lm)
    settings = {"epochs": 3, "learning_rate": 1e-12, "pretrained_lr_scale": 0.5}
    proc = subprocess.Popen(
        [sys.executable, "-m", "recipes.sentiment", f"--workdir={workdir}",
         "--config=configs/sentiment.py:smoke", f"--config.init_from={lm}",
         *(f"--config.{k}={v}" for k, v in settings.items())],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metadata = workdir / "backup" / "state" / "training_metadata.json"
    assert wait_until(metadata.exists, proc, timeout=600), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "metrics.json").exists()
    shutil.rmtree(lm)
    config = _sentiment_config(lm, **settings)
    metrics = train.train_and_evaluate(config, str(workdir))
    assert metrics["export"] == str(workdir / "export" / "1")

    _, lm_cfg, lm_vocab = lm_deploy.finished_run(str(lm_imdb_run))
    vocab = (workdir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert vocab == pretrained.vocabulary(lm_vocab, config.vocab_size)
    model = sentiment_deploy.token_model(config, workdir)  # the run's best checkpoint
    lm_model = lm_deploy.trained_step_model(lm_cfg, lm_vocab, lm_imdb_run)
    embedding_layer, bidirectional = models.first_layers(model)
    (embedding,) = embedding_layer.get_weights()
    (lm_embedding,) = lm_model.get_layer("embedding").get_weights()
    np.testing.assert_allclose(embedding[2:len(vocab) + 2],
                               lm_embedding[[lm_vocab.index(t) + 1 for t in vocab]], atol=1e-6)
    for ours, theirs in zip(bidirectional.forward_layer.get_weights(),
                            lm_model.get_layer("lstm0").get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_language_models_weights_learn_at_the_scaled_rate(lm_imdb_run):
    """`pretrained_lr_scale`: Adam's first step on the language model's weights (embedding,
    forward LSTM) is that fraction of plain Keras Adam's on the same batch; the backward LSTM
    and the classifier take plain Adam's step."""
    config = _sentiment_config(lm_imdb_run, pretrained_lr_scale=0.25, dropout=0.0,
                               word_dropout=0.0)
    vocab = pretrained.vocabulary(pretrained.language_model(config)[2], config.vocab_size)
    ids = np.random.default_rng(0).integers(1, config.vocab_size, (8, 20))
    labels = np.arange(8, dtype=np.float32).reshape(8, 1) % 2
    steps, start = {}, None
    for name in ("scaled", "plain"):
        model = models.create_model(config)
        pretrained.initialize(model, config, vocab)
        start = start or model.get_weights()  # (the backward LSTM's random start too)
        model.set_weights(start)
        optimizer = pretrained.optimizer(model, config) if name == "scaled" else (
            keras.optimizers.Adam(config.learning_rate, clipnorm=config.clipnorm))
        model.compile(optimizer=optimizer, loss="binary_crossentropy")
        model.train_on_batch(ids, labels)
        steps[name] = [v.numpy() - w for v, w in zip(model.weights, start, strict=True)]
        embedding, bidirectional = models.first_layers(model)
        scaled = {v.path for v in embedding.weights + bidirectional.forward_layer.weights}
        factors = [0.25 if v.path in scaled else 1.0 for v in model.weights]
    assert factors.count(0.25) == 4 and len(factors) == 9
    for k, (ours, step) in enumerate(zip(steps["scaled"], steps["plain"], strict=True)):
        assert np.abs(step).max() > 0, model.weights[k].path
        np.testing.assert_allclose(ours, factors[k] * step, rtol=1e-4, atol=1e-7,
                                   err_msg=model.weights[k].path)


@pytest.mark.parametrize("overrides, message", [
    ({"lstm_units": 16}, "--config.lstm_units=16, but the language model"),
    ({"embedding_dim": 32}, "set --config.embedding_dim=16"),
    ({"split": "character"}, "needs --config.split=whitespace"),
])
def test_init_from_a_language_model_that_does_not_fit(lm_imdb_run, tmp_path, overrides,
                                                       message):
    with pytest.raises(RecipeError, match=message.replace("-", r"\-").replace(".", r"\.")):
        train.train_and_evaluate(_sentiment_config(lm_imdb_run, **overrides), str(tmp_path))


def test_init_from_a_character_language_model(language_model_run, tmp_path):
    with pytest.raises(RecipeError, match="does not tokenize as this recipe"):
        train.train_and_evaluate(_sentiment_config(language_model_run), str(tmp_path))


def test_init_from_nothing(tmp_path):
    with pytest.raises(RecipeError, match="holds no trained language model"):
        train.train_and_evaluate(_sentiment_config(tmp_path / "nothing"), str(tmp_path / "w"))


def test_pretrained_config_fits_the_imdb_language_model():
    config = parse_config("sentiment", "--config=configs/sentiment.py:pretrained")
    lm = lm_config.get_config("imdb")
    assert config.init_from == "runs/lm_imdb"
    assert (config.embedding_dim, config.lstm_units) == (lm.embedding_dim, lm.units)
    assert config.vocab_size == lm.vocab_size and config.validation_split == lm.validation_split


def test_deployed_language_model_tokenizes_as_its_export(lm_imdb_run):
    """The deployed LM's Python tokenization (`Streamer.ids`) = the export's in-graph one."""
    written = lm_deploy.export(str(lm_imdb_run), ["tflite"])
    streamer = lm_deploy.Streamer(written["tflite"])
    _, config, vocab = lm_deploy.finished_run(str(lm_imdb_run))
    text = "This MOVIE<br />was great!!! Really, truly\ngreat... (qwertyuiop)"
    lookup = lm_input.make_lookup(config, vocab)
    expected = lookup(lm_input.tokenize(tf.constant([text]), config.level,
                                        config.standardize)[0]).numpy().tolist()
    assert streamer.ids(text) == [int(lookup(config.start_token)), *expected]
    assert len(expected) == 9 and expected[-1] == 0  # "qwertyuiop" is unknown
