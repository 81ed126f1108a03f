"""Deployment formats of every recipe: op lists, the SavedModel's results, tokenizers, errors.

References: each recipe's SavedModel export (what it computes from raw text or
ids), TensorFlow's `TextVectorization` (the tokenizer), the Keras step model
(the streaming language model), and the TFLite op lists.
"""

import re
import sys

import numpy as np
import pytest
import tensorflow as tf
from recipe_testing import assert_one_line_error, run_recipe

from recipes.common import deploy, language_models
from recipes.common.errors import RecipeError

TEXTS = ["", "   \t\n", "great " * 600, "我爱中国", "😀🎬👍", "A wonderful, moving film.",
         "Dreadful. The worst acting I have ever seen.", "ÉCOLE<br />Bad<br>acting!!"]
FUSED = "UNIDIRECTIONAL_SEQUENCE_LSTM"


def _assert_fused_builtins_only(path):
    content = path.read_bytes()
    ops = deploy.tflite_ops(content)
    assert FUSED in ops and not deploy.unwanted_ops(content), ops


@pytest.fixture(scope="module")
def sentiment_deployed(sentiment_run):
    from recipes.sentiment import deploy as sentiment_deploy

    written = sentiment_deploy.export(str(sentiment_run), list(deploy.FORMATS))
    assert sorted(written) == sorted(deploy.FORMATS)
    return sentiment_run


def test_sentiment_formats_are_fused_and_give_the_saved_models_probabilities(
        sentiment_deployed):
    from recipes.sentiment.deploy import predictor

    out = sentiment_deployed / "deploy"
    for name in ("tflite", "tflite_dynamic", "tflite_int8"):
        _assert_fused_builtins_only(out / deploy.FILES[name])
    expected = predictor(str(sentiment_deployed / "export"))(TEXTS)
    for name in ("tflite", "onnx"):
        np.testing.assert_allclose(predictor(str(out / deploy.FILES[name]))(TEXTS), expected,
                                   atol=1e-4, err_msg=name)
    for name in ("tflite_dynamic", "tflite_int8"):  # quantized: close
        np.testing.assert_allclose(predictor(str(out / deploy.FILES[name]))(TEXTS), expected,
                                   atol=0.03, err_msg=name)
    sizes = {n: (out / deploy.FILES[n]).stat().st_size for n in deploy.FORMATS}
    assert sizes["tflite_int8"] < sizes["tflite"] / 2


def test_sentiment_onnx_batches_are_padding_invariant(sentiment_deployed):
    model = deploy.Model(sentiment_deployed / "deploy" / "model.onnx")
    rng = np.random.default_rng(0)
    rows = [rng.integers(2, 2000, size=n) for n in (3, 17, 40)]
    alone = [model(tokens=r[None].astype(np.int64))["probability"].item() for r in rows]
    batch = np.zeros((3, 50), np.int64)
    for k, r in enumerate(rows):
        batch[k, :len(r)] = r
    np.testing.assert_allclose(model(tokens=batch)["probability"].reshape(-1), alone,
                               atol=1e-6)


def test_sentiment_tokenizer_equals_the_in_graph_tokenization(sentiment_run):
    from recipes.sentiment import input_pipeline
    from recipes.sentiment.deploy import run_config
    from recipes.sentiment.tokenizer import Tokenizer

    config = run_config(sentiment_run / "config.json")
    vectorizer = input_pipeline.make_vectorizer(config, None, sentiment_run / "vocab.txt")
    tokenizer = Tokenizer.from_run(sentiment_run, config)
    (reviews,) = input_pipeline.load_texts(config, ["test[:500]"])
    texts = [t.decode() for t, _ in reviews.as_numpy_iterator()] + TEXTS + [
        "x\u00a0y\u3000z\vw\x1c", "<BR/>tab\there", "l'été çà et là"]
    ids = input_pipeline.to_ids(vectorizer, tf.constant(texts), config.max_length).numpy()
    for text, row in zip(texts, ids, strict=True):
        assert tokenizer.ids(text) == [int(i) for i in row if i], text


def test_sentiment_accuracy_of_every_format_on_real_reviews(sentiment_deployed):
    """`evaluate`: the float formats score as the SavedModel; int8 stays close per review.

    (The smoke model's probabilities are all near 0.5, so its accuracy says
    little about int8; docs/deploy.md gives that for the real model.)
    """
    from recipes.sentiment import input_pipeline
    from recipes.sentiment.deploy import accuracy, config_of, predictor

    config = config_of(str(sentiment_deployed / "export"))
    saved = accuracy(str(sentiment_deployed / "export"), config, "test[:128]")
    assert saved["examples"] == 128
    for name in ("tflite", "onnx"):
        assert accuracy(str(sentiment_deployed / "deploy" / deploy.FILES[name]), config,
                        "test[:128]") == saved
    (reviews,) = input_pipeline.load_texts(config, ["test[:128]"])
    texts = [t.decode() for t, _ in reviews.as_numpy_iterator()]
    int8 = predictor(str(sentiment_deployed / "deploy" / "model_int8.tflite"))(texts)
    np.testing.assert_allclose(int8, predictor(str(sentiment_deployed / "export"))(texts),
                               atol=0.03)


@pytest.fixture(scope="module")
def language_model_deployed(language_model_run):
    """The smoke language model's `tflite` and `onnx` files."""
    from recipes.language_model import deploy as lm_deploy

    return lm_deploy.export(str(language_model_run), ["tflite", "onnx"])


def test_language_model_streams_as_the_step_model_and_generates_as_the_export(
        language_model_run, language_model_deployed):
    from recipes.language_model import deploy as lm_deploy

    written = language_model_deployed
    _assert_fused_builtins_only(written["tflite"])
    path, config, vocab = language_models.finished_run(str(language_model_run))
    step = language_models.trained_step_model(config, vocab, path)
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    streamers = [lm_deploy.Streamer(written[name]) for name in ("tflite", "onnx")]
    ids = streamers[0].ids(text)
    # Per step: the deployed models' logits and states = the Keras step model's.
    states = [np.zeros((1, config.units), np.float32) for _ in range(2 * config.num_layers)]
    carried = [list(states), list(states)]
    for token in ids:
        expected, *states = [np.asarray(o) for o in step(
            [np.array([[token]], np.int32), np.ones((1, 1), bool), *states], training=False)]
        for k, streamer in enumerate(streamers):
            logits, carried[k] = streamer.step(token, carried[k])
            np.testing.assert_allclose(logits, expected.reshape(-1), atol=1e-5)
    # 200 greedy tokens: the same text as the SavedModel's `generate` at temperature 0.
    export = lm_deploy.sample(str(path / "export"), "ROMEO:", 200, 0.0, 0)
    for streamer in streamers:
        assert streamer.generate("ROMEO:", 200) == export


def test_language_model_onnx_takes_padded_batches(language_model_run, language_model_deployed):
    from recipes.language_model import deploy as lm_deploy

    model = deploy.Model(language_model_deployed["onnx"])
    path, config, vocab = language_models.finished_run(str(language_model_run))
    step = language_models.trained_step_model(config, vocab, path)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, len(vocab) + 1, size=(3, 9)).astype(np.int32)
    mask = np.arange(9)[None] < np.array([9, 4, 1])[:, None]
    states = [rng.normal(size=(3, config.units)).astype(np.float32)
              for _ in range(2 * config.num_layers)]
    names = [f"{k}{i}" for i in range(config.num_layers) for k in "hc"]
    actual = model(tokens=tokens, mask=mask, **dict(zip(names, states, strict=True)))
    expected = step([tokens, mask, *states], training=False)
    for name, value in zip(lm_deploy.output_names(config), expected, strict=True):
        np.testing.assert_allclose(actual[name], value, atol=1e-5, err_msg=name)


def test_copy_task_formats_predict_as_the_export(copy_task_run):
    from configs import copy_task
    from recipes.copy_task import deploy as copy_deploy
    from recipes.copy_task import input_pipeline

    written = copy_deploy.export(str(copy_task_run), ["tflite", "onnx"])
    _assert_fused_builtins_only(written["tflite"])
    inputs, _ = input_pipeline.held_out(copy_task.get_config("smoke"))
    expected = copy_deploy.predict(str(copy_task_run / "export"), inputs[:8])
    for path in written.values():
        np.testing.assert_array_equal(copy_deploy.predict(str(path), inputs[:8]), expected)


def test_deploy_errors(tmp_path, sentiment_deployed):
    from recipes.sentiment import deploy as sentiment_deploy

    with pytest.raises(RecipeError, match="holds no trained sentiment model"):
        sentiment_deploy.export(str(tmp_path / "nothing"), ["tflite"])
    with pytest.raises(RecipeError, match="unknown format 'coreml'"):
        sentiment_deploy.export(str(sentiment_deployed), ["tflite", "coreml"])
    (tmp_path / "model.tflite").write_bytes(b"not a model")
    with pytest.raises(RecipeError, match="not a readable tflite model"):
        deploy.Model(tmp_path / "model.tflite")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(RecipeError, match="not a readable onnx model"):
        deploy.Model(tmp_path / "model.onnx")
    with pytest.raises(RecipeError, match="no model file"):
        deploy.Model(tmp_path / "missing.tflite")
    from recipes.language_model.deploy import Streamer

    with pytest.raises(RecipeError, match="no tokenizer beside"):
        Streamer(sentiment_deployed / "deploy" / "model.tflite")
    other = tmp_path / "other"  # another recipe's model and tokenizer, and a vocab.json
    other.mkdir()
    for name in ("model.tflite", "tokenizer.json"):
        (other / name).write_bytes((sentiment_deployed / "deploy" / name).read_bytes())
    (other / "vocab.json").write_text("[]")
    with pytest.raises(RecipeError, match="has no 'level': .* is not a deployed language"):
        Streamer(other / "model.tflite")


@pytest.mark.parametrize("module, model", [("onnxruntime", "model.onnx"),
                                           ("ai_edge_litert", "model.tflite")])
def test_missing_runtime_is_one_line(monkeypatch, sentiment_deployed, module, model):
    """Without the deploy extra, running a deployed model says what to install."""
    for name in list(sys.modules):  # as if never installed: the import fails
        if name == module or name.startswith(module + "."):
            monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RecipeError, match=rf"{module}\S* is not installed: .*\[deploy\]"):
        deploy.Model(sentiment_deployed / "deploy" / model)


def test_export_command_line(sentiment_deployed):
    """`export --format=...` through the entry point: writes and lists the file, and nothing
    else (not the int8 quantizer's settings line)."""
    path = sentiment_deployed / "deploy" / "model_int8.tflite"
    before = path.stat().st_mtime_ns
    proc = run_recipe("sentiment", "export", f"--workdir={sentiment_deployed}",
                      "--format=tflite_int8")
    assert "fully_quantize" not in proc.stderr, proc.stderr
    name, size, printed = proc.stdout.strip().split("\t")
    assert (name, printed) == ("tflite_int8", str(path)) and path.stat().st_mtime_ns > before
    assert size == f"{path.stat().st_size / 2**20:.2f} MiB"


def test_sentiment_ensemble_averages_its_members(sentiment_run, tmp_path):
    """`ensemble` through the entry point: a SavedModel whose probability is the mean of its
    members' (each member's own export is the reference); `evaluate` reads it."""
    from configs import sentiment as sentiment_config
    from recipes.sentiment import deploy as sentiment_deploy
    from recipes.sentiment import input_pipeline, train

    config = sentiment_config.get_config("smoke")
    config.seed, config.epochs = 1, 1
    train.train_and_evaluate(config, str(tmp_path / "seed1"))
    members = [str(sentiment_run / "export"), str(tmp_path / "seed1" / "export")]
    proc = run_recipe("sentiment", "ensemble", f"--workdir={tmp_path / 'ensemble'}",
                      "--models=" + ",".join(members))
    assert proc.stdout.strip() == str(tmp_path / "ensemble" / "export" / "1")

    (reviews,) = input_pipeline.load_texts(config, ["test[:64]"])
    texts, labels = zip(*[(t.decode("utf-8"), y) for t, y in reviews.as_numpy_iterator()],
                        strict=True)
    texts = list(texts) + TEXTS
    expected = [sentiment_deploy.predictor(m)(texts) for m in members]
    assert np.abs(expected[0] - expected[1]).max() > 1e-3  # two different models
    ensemble = str(tmp_path / "ensemble" / "export")
    mean = np.mean(expected, axis=0)
    np.testing.assert_allclose(sentiment_deploy.predictor(ensemble)(texts), mean, atol=1e-6)
    result = sentiment_deploy.accuracy(ensemble, sentiment_deploy.config_of(ensemble),
                                       "test[:64]")
    assert result == {"accuracy": np.mean((mean[:64] >= 0.5) == np.array(labels, bool)),
                      "examples": 64}


def test_sentiment_ensemble_errors(sentiment_run, sentiment_zh_run, copy_task_run, tmp_path):
    from recipes.sentiment import deploy as sentiment_deploy

    out = tmp_path / "ensemble"
    imdb, zh = str(sentiment_run / "export"), str(sentiment_zh_run / "export")
    for models, message in [
        ([imdb], "ensemble needs two or more exports"),
        ([imdb, str(tmp_path / "missing")], "no SavedModel in"),
        ([imdb, zh], "trained on different datasets (chinese_reviews, imdb_reviews)"),
        ([imdb, str(copy_task_run / "export")], "is not a sentiment export"),
    ]:
        with pytest.raises(RecipeError, match=re.escape(message)):
            sentiment_deploy.ensemble(models, str(out))
    with pytest.raises(RecipeError, match="holds a training run; pass a new --workdir"):
        sentiment_deploy.ensemble([imdb, imdb], str(sentiment_run))
    assert not out.exists()
    proc = run_recipe("sentiment", "ensemble", f"--models={imdb},{imdb}", check=False)
    assert_one_line_error(proc, "ensemble needs --workdir=WORKDIR")
