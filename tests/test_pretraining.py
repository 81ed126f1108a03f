"""Sentiment from a language model: the IMDB LM's words, and `--config.init_from`."""

import json
import re
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
from recipes.common import checkpoints, data, language_models
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


@pytest.fixture(scope="module")
def lm_imdb_backward_run(lm_imdb_run, tmp_path_factory):
    """A finished backward LM on `lm_imdb_run`'s embedding (`imdb_backward`, smoke sizes)."""
    config = _backward_lm_config(lm_imdb_run)
    workdir = tmp_path_factory.mktemp("language_model_imdb_backward_smoke")
    lm_train.train_and_evaluate(config, str(workdir))
    return workdir


def _backward_lm_config(lm_run, **overrides):
    config = lm_config.get_config("imdb_smoke")
    backward = lm_config.get_config("imdb_backward")
    config.reverse, config.embedding_from = backward.reverse, str(lm_run)
    config.update(overrides)
    return config


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


@pytest.mark.slow
def test_imdb_language_model_has_no_test_split(lm_imdb_run):
    config = lm_config.get_config("imdb_smoke")
    train_text, val_text, test_text = lm_input.read_splits(config)
    assert test_text is None and not config.test_split
    assert train_text.count("\n") == 199  # 200 reviews, one line end between two
    metrics = (lm_imdb_run / "metrics.json").read_text()
    assert '"test"' not in metrics and '"validation"' in metrics


def test_backward_language_model_reads_the_stream_backwards():
    """`reverse`: the reversed split's tokens are the forward split's, last first (line ends
    included: `<eos>` between two reviews); a character model's text is the text reversed."""
    forward, backward = (lm_config.get_config("imdb_smoke") for _ in range(2))
    backward.reverse = True
    forward_text, backward_text = (lm_input.read_splits(c)[0] for c in (forward, backward))
    forward_tokens, backward_tokens = (lm_input.tokenize(
        tf.constant([text]), c.level, c.standardize)[0].numpy().tolist()
        for text, c in ((forward_text, forward), (backward_text, backward)))
    assert backward_tokens == forward_tokens[::-1]
    assert forward_tokens.count(b"<eos>") == 199 and "<br" in forward_text
    shakespeare = lm_config.get_config("smoke")
    assert lm_input.reverse("ab c\nd!", shakespeare) == "!d\nc ba"


@pytest.mark.slow
def test_backward_language_model_trains_on_the_forward_embedding(lm_imdb_run,
                                                                 lm_imdb_backward_run):
    """`embedding_from`: the forward model's vocabulary and embedding, unchanged by training;
    the LSTM and the output layer are its own."""
    (_, forward_cfg, forward_vocab), (_, backward_cfg, backward_vocab) = (
        language_models.finished_run(str(run)) for run in (lm_imdb_run, lm_imdb_backward_run))
    assert backward_vocab == forward_vocab and backward_cfg.reverse
    forward, backward = (language_models.trained_step_model(c, v, run) for c, v, run in (
        (forward_cfg, forward_vocab, lm_imdb_run),
        (backward_cfg, backward_vocab, lm_imdb_backward_run)))
    for name in ("embedding", "lstm0", "logits"):
        ours, theirs = backward.get_layer(name).get_weights(), forward.get_layer(name).get_weights()
        same = all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
        assert same == (name == "embedding"), name


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    ({"embedding_dim": 32}, "--config.embedding_dim=32, but the language model in"),
    ({"vocab_size": 500}, "--config.vocab_size=500, but the language model in"),
    ({"embedding_from": "/nonexistent"}, "--config.embedding_from=/nonexistent: "),
])
def test_embedding_from_a_language_model_that_does_not_fit(lm_imdb_run, tmp_path, overrides,
                                                            message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        lm_train.train_and_evaluate(_backward_lm_config(lm_imdb_run, **overrides),
                                    str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_embedding_from_keeps_its_workdirs_vocabulary(lm_imdb_run, lm_imdb_backward_run,
                                                       tmp_path):
    """A rerun in a workdir whose vocabulary is not `embedding_from`'s is an error (its
    backup's embedding rows are of those other words)."""
    workdir = tmp_path / "w"
    shutil.copytree(lm_imdb_backward_run, workdir)
    (workdir / "metrics.json").unlink()  # a rerun that trains (a finished run stays finished)
    vocab = json.loads((workdir / "vocab.json").read_text(encoding="utf-8"))
    (workdir / "vocab.json").write_text(json.dumps(vocab[::-1]), encoding="utf-8")
    with pytest.raises(RecipeError, match="is not the vocabulary of --config.embedding_from="):
        lm_train.train_and_evaluate(_backward_lm_config(lm_imdb_run), str(workdir))


@pytest.mark.slow
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

    lm = language_models.trained_step_model(lm_cfg, lm_vocab, lm_imdb_run)
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


@pytest.mark.slow
def test_init_from_with_normalized_embeddings_and_adversarial_training(lm_imdb_run, tmp_path):
    """The forward LSTM's input projection of the normalized rows is the language model's of
    its rows (the LSTM starts from the language model's function); such a run trains with
    both perturbations and exports."""
    config = _sentiment_config(lm_imdb_run, normalize_embeddings=True, adversarial_epsilon=1.0,
                               virtual_adversarial_epsilon=1.0, epochs=1)
    _, lm_cfg, lm_vocab = pretrained.language_model(config)
    vocab = pretrained.vocabulary(lm_vocab, config.vocab_size)
    model = models.create_model(config)
    layer, bidirectional = models.first_layers(model)
    layer.frequencies.assign(np.random.default_rng(0).integers(0, 50, config.vocab_size))
    pretrained.initialize(model, config, vocab)
    lm = language_models.trained_step_model(lm_cfg, lm_vocab, lm_imdb_run)
    rows = [0] + [lm_vocab.index(t) + 1 for t in vocab]  # ids 1, 2, ... in the LM's ids
    kernel, _, bias = lm.get_layer("lstm0").get_weights()
    cell = bidirectional.forward_layer.cell
    theirs = lm.get_layer("embedding").get_weights()[0][rows] @ kernel + bias
    ours = layer.embeddings.numpy()[1:len(rows) + 1] @ cell.kernel.numpy() + cell.bias.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)

    metrics = train.train_and_evaluate(config, str(tmp_path))
    assert {"adversarial_loss", "virtual_adversarial_loss"} <= metrics["train"].keys()
    assert (tmp_path / "export" / "1" / "saved_model.pb").exists()


@pytest.mark.slow
def test_fine_tuning_starts_from_the_language_models_and_resumes_without_them(
        lm_imdb_run, lm_imdb_backward_run, tmp_path):
    """A run from both language models killed (-9) after its first epoch and rerun, at a
    learning rate of ~0 (its weights stay where they started; discriminative rates on): it
    resumes from its backup, which the language models' removal shows (a run from the start
    needs them), and ends with their vocabulary, embedding and forward and backward LSTMs."""
    lm, lm_backward, workdir = tmp_path / "lm", tmp_path / "lm_backward", tmp_path / "run"
    shutil.copytree(lm_imdb_run, lm)
    shutil.copytree(lm_imdb_backward_run, lm_backward)
    settings = {"epochs": 3, "learning_rate": 1e-12, "pretrained_lr_scale": 0.5,
                "init_backward_from": lm_backward}
    proc = subprocess.Popen(
        [sys.executable, "-m", "recipes.sentiment", f"--workdir={workdir}",
         "--config=configs/sentiment.py:smoke", f"--config.init_from={lm}",
         *(f"--config.{k}={v}" for k, v in settings.items())],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metadata = workdir / "backup" / "state" / "training_metadata.json"
    assert wait_until(metadata.exists, proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "metrics.json").exists()
    shutil.rmtree(lm)
    shutil.rmtree(lm_backward)
    config = _sentiment_config(lm, **{**settings, "init_backward_from": str(lm_backward)})
    metrics = train.train_and_evaluate(config, str(workdir))
    assert metrics["export"] == str(workdir / "export" / "1")

    _, lm_cfg, lm_vocab = language_models.finished_run(str(lm_imdb_run))
    vocab = (workdir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert vocab == pretrained.vocabulary(lm_vocab, config.vocab_size)
    model = sentiment_deploy.token_model(config, workdir)  # the run's best checkpoint
    lm_model = language_models.trained_step_model(lm_cfg, lm_vocab, lm_imdb_run)
    embedding_layer, bidirectional = models.first_layers(model)
    (embedding,) = embedding_layer.get_weights()
    (lm_embedding,) = lm_model.get_layer("embedding").get_weights()
    np.testing.assert_allclose(embedding[2:len(vocab) + 2],
                               lm_embedding[[lm_vocab.index(t) + 1 for t in vocab]], atol=1e-6)
    _, backward_cfg, backward_vocab = language_models.finished_run(str(lm_imdb_backward_run))
    backward_model = language_models.trained_step_model(backward_cfg, backward_vocab,
                                                        lm_imdb_backward_run)
    for layer, source in ((bidirectional.forward_layer, lm_model),
                          (bidirectional.backward_layer, backward_model)):
        for ours, theirs in zip(layer.get_weights(), source.get_layer("lstm0").get_weights(),
                                strict=True):
            np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.slow
def test_init_backward_from_starts_the_backward_lstm(lm_imdb_run, lm_imdb_backward_run):
    """With both language models, the first Bi-LSTM layer at the review's first token holds
    the backward LM's state after reading the review from its last token to its first, and
    at its last token the forward LM's state after reading it forwards (LM ids, zero start)."""
    config = _sentiment_config(lm_imdb_run, init_backward_from=str(lm_imdb_backward_run))
    vocab = pretrained.vocabulary(pretrained.language_model(config)[2], config.vocab_size)
    model = models.create_model(config)
    pretrained.initialize(model, config, vocab)
    embedding, bidirectional = models.first_layers(model)
    text = "The movie was bad, but the acting was good."
    outputs = bidirectional(embedding(np.array([Tokenizer(vocab, 100).ids(text)]))).numpy()[0]

    units = config.lstm_units
    for run, position, half in ((lm_imdb_run, -1, slice(0, units)),
                                (lm_imdb_backward_run, 0, slice(units, 2 * units))):
        _, lm_cfg, lm_vocab = language_models.finished_run(str(run))
        lm = language_models.trained_step_model(lm_cfg, lm_vocab, run)
        ids = lm_input.make_lookup(lm_cfg, lm_vocab)(lm_input.tokenize(
            tf.constant([text]), lm_cfg.level, lm_cfg.standardize)[0]).numpy()
        ids = ids[::-1] if lm_cfg.reverse else ids
        zeros = np.zeros((1, units), np.float32)
        _, h, _ = lm([ids[None], np.ones((1, len(ids)), bool), zeros, zeros])
        np.testing.assert_allclose(outputs[position, half], h.numpy()[0], atol=1e-5)


@pytest.mark.slow
def test_init_backward_from_a_language_model_that_does_not_fit(lm_imdb_run, lm_imdb_backward_run,
                                                               tmp_path):
    """The wrong direction either way, no forward model, and a forward model whose embedding
    the backward one was not trained on: one error each, before any training."""
    cases = [({"init_backward_from": str(lm_imdb_run)}, "that language model reads forwards"),
             ({"init_from": str(lm_imdb_backward_run)}, "that language model reads backwards"),
             ({"init_from": "", "init_backward_from": str(lm_imdb_backward_run)},
              "--config.init_backward_from needs --config.init_from")]
    for overrides, message in cases:
        with pytest.raises(RecipeError, match=re.escape(message)):
            train.train_and_evaluate(_sentiment_config(lm_imdb_run, **overrides),
                                     str(tmp_path / "w"))
        assert not (tmp_path / "w").exists()
    other = tmp_path / "other_lm"  # the same LM, its embedding changed
    shutil.copytree(lm_imdb_run, other)
    _, lm_cfg, lm_vocab = language_models.finished_run(str(other))
    training = language_models.create_model(lm_cfg, len(lm_vocab) + 1,
                                            batch_size=lm_cfg.batch_size)
    training.load_weights(checkpoints.best_checkpoint(other))
    layer = training.get_layer("embedding")
    layer.set_weights([layer.get_weights()[0] + 0.01])
    training.save_weights(checkpoints.best_checkpoint(other))
    config = _sentiment_config(other, init_backward_from=str(lm_imdb_backward_run))
    vocab = pretrained.vocabulary(lm_vocab, config.vocab_size)
    with pytest.raises(RecipeError, match="embedding is not the one of --config.init_from"):
        pretrained.initialize(models.create_model(config), config, vocab)


@pytest.mark.slow
@pytest.mark.parametrize("backward, schedule, model", [
    (False, "constant", "bilstm"), (True, "constant", "bilstm"), (False, "cosine", "bilstm"),
    (False, "constant", "bilstm_ngrams")])
def test_language_models_weights_learn_at_the_scaled_rate(lm_imdb_run, lm_imdb_backward_run,
                                                          backward, schedule, model):
    """`pretrained_lr_scale`: Adam's step on the language models' weights (embedding,
    forward LSTM; the backward LSTM with `init_backward_from`) is that fraction of plain Keras
    Adam's on the same batch; the other weights take plain Adam's step, but for the n-gram
    weights of `model="bilstm_ngrams"`, which take `ngrams_lr_scale` times it. With
    `lr_schedule="cosine"`, at step t of T the rate is lr * (1 + cos(pi t / T)) / 2."""
    config = _sentiment_config(lm_imdb_run, pretrained_lr_scale=0.25, dropout=0.0,
                               word_dropout=0.0, lr_schedule=schedule, model=model,
                               bag_buckets=4096, ngrams_lr_scale=3.0,
                               init_backward_from=str(lm_imdb_backward_run) if backward else "")
    steps_per_epoch, t = 10, 7  # T = epochs * steps_per_epoch = 20
    rate = config.learning_rate * (
        (1 + np.cos(np.pi * t / (config.epochs * steps_per_epoch))) / 2
        if schedule == "cosine" else 1.0)
    vocab = pretrained.vocabulary(pretrained.language_model(config)[2], config.vocab_size)
    ids = np.random.default_rng(0).integers(1, config.vocab_size, (8, 20))
    labels = np.arange(8, dtype=np.float32).reshape(8, 1) % 2
    steps, start = {}, None
    for name in ("scaled", "plain"):
        network = models.create_model(config)
        pretrained.initialize(network, config, vocab)
        start = start or network.get_weights()  # (the backward LSTM's random start too)
        network.set_weights(start)
        optimizer = (
            pretrained.optimizer(network, config, train.learning_rate(config, steps_per_epoch))
            if name == "scaled" else keras.optimizers.Adam(rate, clipnorm=config.clipnorm))
        optimizer.build(network.trainable_variables)
        optimizer.iterations.assign(t)  # (Adam's bias correction: step t + 1 for both)
        network.compile(optimizer=optimizer, loss="binary_crossentropy")
        network.train_on_batch(ids, labels)
        steps[name] = [v.numpy() - w for v, w in zip(network.weights, start, strict=True)]
        embedding, bidirectional = models.first_layers(network)
        scaled = {w.path for w in embedding.weights + bidirectional.forward_layer.weights + (
            bidirectional.backward_layer.weights if backward else [])}
        ngrams = {w.path for w in network.weights if w.path.startswith("ngrams/")}
        factors = [0.25 if v.path in scaled else 3.0 if v.path in ngrams else 1.0
                   for v in network.weights]
    assert factors.count(0.25) == (7 if backward else 4)
    assert factors.count(3.0) == (2 if model == "bilstm_ngrams" else 0)  # table, bias
    assert len(factors) == (11 if model == "bilstm_ngrams" else 9)
    for k, (ours, step) in enumerate(zip(steps["scaled"], steps["plain"], strict=True)):
        assert np.abs(step).max() > 0, network.weights[k].path
        np.testing.assert_allclose(ours, factors[k] * step, rtol=1e-4, atol=1e-7,
                                   err_msg=network.weights[k].path)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    ({"lstm_units": 16}, "--config.lstm_units=16, but the language model"),
    ({"embedding_dim": 32}, "set --config.embedding_dim=16"),
    ({"split": "character"}, "needs --config.split=whitespace"),
])
def test_init_from_a_language_model_that_does_not_fit(lm_imdb_run, tmp_path, overrides,
                                                       message):
    with pytest.raises(RecipeError, match=re.escape(message)):
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


@pytest.mark.slow
def test_deployed_language_model_tokenizes_as_its_export(lm_imdb_run):
    """The deployed LM's Python tokenization (`Streamer.ids`) = the export's in-graph one."""
    written = lm_deploy.export(str(lm_imdb_run), ["tflite"])
    streamer = lm_deploy.Streamer(written["tflite"])
    _, config, vocab = language_models.finished_run(str(lm_imdb_run))
    text = "This MOVIE<br />was great!!! Really, truly\ngreat... (qwertyuiop)"
    lookup = lm_input.make_lookup(config, vocab)
    expected = lookup(lm_input.tokenize(tf.constant([text]), config.level,
                                        config.standardize)[0]).numpy().tolist()
    assert streamer.ids(text) == [int(lookup(config.start_token)), *expected]
    assert len(expected) == 9 and expected[-1] == 0  # "qwertyuiop" is unknown
