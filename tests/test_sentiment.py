"""recipes.sentiment end to end on the smoke config: files, TensorBoard, export, serving, errors."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from recipe_testing import (
    ROOT,
    assert_finished_run_stays_finished,
    assert_one_line_error,
    parse_config,
    run_recipe,
    summary_tags,
)

from configs import sentiment as sentiment_config
from recipes.common.errors import RecipeError
from recipes.sentiment import deploy, input_pipeline, train
from recipes.sentiment import model as models

SERVING_INPUTS = ["", "   \t\n", "great " * 20000, "我爱中国", "😀🎬👍",
                  "A wonderful, moving film.", "Dreadful. The worst acting I have ever seen."]


def test_workdir_contents(sentiment_run):
    metrics = json.loads((sentiment_run / "metrics.json").read_text())
    config = json.loads((sentiment_run / "config.json").read_text())
    assert config["train_split"] == "train[:512]"
    for split in ("train", "validation", "test"):
        assert np.isfinite(metrics[split]["loss"]) and metrics[split]["loss"] > 0
    assert (sentiment_run / "checkpoints" / "best.weights.h5").exists()
    assert not (sentiment_run / "backup").exists()  # the backup is deleted on success
    assert sorted(p.name for p in (sentiment_run / "export").iterdir()) == ["1"]
    assert metrics["export"] == str(sentiment_run / "export" / "1")


def test_a_finished_run_stays_finished(sentiment_run, capsys):
    assert_finished_run_stays_finished("sentiment", "smoke", sentiment_run, capsys)


def test_test_accuracy_is_the_exports_accuracy(sentiment_run):
    """metrics.json's test accuracy is what the export scores on the test split."""
    metrics = json.loads((sentiment_run / "metrics.json").read_text())
    config = deploy.config_of(str(sentiment_run / "export"))
    scored = deploy.accuracy(str(sentiment_run / "export"), config, config.test_split)
    assert scored["examples"] == 256
    assert scored["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)


def test_training_batches_are_full_and_hold_every_review_once_per_epoch(tmp_path):
    config = sentiment_config.get_config("smoke")
    train_raw, _, _ = input_pipeline.load_splits(config)
    vectorizer = input_pipeline.make_vectorizer(config, train_raw, tmp_path / "vocab.txt")
    texts, labels = next(iter(train_raw.batch(10**6)))
    ids = input_pipeline.to_ids(vectorizer, texts, config.max_length).numpy()
    reviews = sorted((tuple(np.trim_zeros(row, "b")), label)
                     for row, label in zip(ids, labels.numpy(), strict=True) if row[0])

    ds, steps = input_pipeline.training_batches(train_raw, vectorizer, config)
    batches = [[t.numpy() for t in batch] for batch in ds]
    assert len(batches) == config.epochs * steps
    filled = 0
    for e in range(config.epochs):
        rows = []
        for ids, labels, weights in batches[e * steps:(e + 1) * steps]:
            assert len(ids) == len(labels) == config.batch_size
            np.testing.assert_array_equal(weights, ids[:, 0] != 0)  # rows filling it: empty
            filled += int(weights.min() == 0)
            rows += [(tuple(np.trim_zeros(row, "b")), label)
                     for row, label, weight in zip(ids, labels, weights, strict=True) if weight]
        assert sorted(rows) == reviews
    assert filled > 0  # (buckets' last batches)


def test_tensorboard_tags(sentiment_run):
    tags = summary_tags(sentiment_run / "tensorboard")
    expected = {"epoch_loss", "epoch_accuracy", "epoch_learning_rate",
                "train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "learning_rate",
                "steps/train_loss", "_hparams_/session_start_info"}
    assert expected <= tags, expected - tags
    for direction in ("forward", "backward"):
        for gate in ("forget", "input", "output"):
            assert any(t.startswith("gates/") and t.endswith(f"{direction}/{gate}") for t in tags)


def _keras_probabilities(workdir, texts):
    """The trained Keras model (best checkpoint) on `texts`, outside the export."""
    from recipes.sentiment import input_pipeline
    from recipes.sentiment import model as models

    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    vectorizer = input_pipeline.make_vectorizer(config, None, workdir / "vocab.txt")
    model = models.create_model(config)
    model.load_weights(workdir / "checkpoints" / "best.weights.h5")
    ids = input_pipeline.to_ids(vectorizer, tf.constant(texts), config.max_length)
    return model(ids, training=False).numpy()[:, 0]


def test_export_serves_in_fresh_process(sentiment_run, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        texts = json.loads(sys.stdin.read())
        loaded = tf.saved_model.load({str(sentiment_run / "export" / "1")!r})
        serve = loaded.signatures["serving_default"]
        single = [serve(text=tf.constant([t]))["probability"].numpy()[0] for t in texts]
        batch = serve(text=tf.constant(texts))
        assert not [m for m in sys.modules if m.startswith(("lstm_tf", "recipes"))]
        print(json.dumps({{"single": [float(p) for p in single],
                          "batch": batch["probability"].numpy().tolist(),
                          "label": batch["label"].numpy().tolist()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(SERVING_INPUTS),
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    # No warning (e.g. no custom gradient left unsaved). absl's banner is not one: it comes
    # with TensorFlow's first log line, which only CPUs with oneDNN on print before logging starts.
    banner = ("WARNING: All log messages before absl::InitializeLog() is called are written "
              "to STDERR")
    assert not [line for line in proc.stderr.splitlines() if "WARNING" in line and line != banner]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    batch = np.array(out["batch"])
    np.testing.assert_array_equal(out["label"], (batch >= 0.5).astype(int))
    np.testing.assert_allclose(out["single"], batch, atol=1e-5)  # padding changes nothing
    np.testing.assert_allclose(batch, _keras_probabilities(sentiment_run, SERVING_INPUTS),
                               atol=1e-5)


def test_saved_model_cli_shows_signature(sentiment_run):
    cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
    proc = subprocess.run([str(cli), "show", "--dir", str(sentiment_run / "export" / "1"),
                           "--tag_set", "serve", "--signature_def", "serving_default"],
                          capture_output=True, text=True, check=True)
    assert "inputs['text'] tensor_info:" in proc.stdout
    assert "dtype: DT_STRING" in proc.stdout
    assert "outputs['probability'] tensor_info:" in proc.stdout


def test_command_line(sentiment_run, tmp_path):
    """The entry point: `predict` prints one line per text; a mistake is one `error:` line."""
    texts = ["Loved it!", ""]
    proc = run_recipe("sentiment", "predict", f"--model={sentiment_run / 'export'}", *texts)
    probabilities = deploy.predictor(str(sentiment_run / "export"))(texts)
    for line, p in zip(proc.stdout.strip().splitlines(), probabilities, strict=True):
        label, printed, _ = line.split("\t")
        assert printed == f"{p:.4f}" and label == ("positive" if p >= 0.5 else "negative")
    # From another directory: the default config is found beside the package.
    proc = run_recipe("sentiment", f"--workdir={tmp_path / 'run'}", "--config.batch_size=0",
                      check=False, cwd=tmp_path,
                      env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_line_error(proc, "--config.batch_size=0 is invalid")
    assert not (tmp_path / "run").exists()


LOG_LINES = re.compile(r"^[IWE]\d{4} |oneDNN|XLA service|absl::InitializeLog", re.MULTILINE)


@pytest.mark.slow
def test_console_is_clean_and_a_finished_run_says_so_in_one_line(tmp_path):
    """The command as a user types it (no TF_CPP_MIN_LOG_LEVEL): Keras's epoch lines and the
    result line, no logging; the same command again prints one line and trains nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = ("sentiment", f"--workdir={tmp_path}", "--config=configs/sentiment.py:smoke")
    first = run_recipe(*command, env=env, stderr=subprocess.STDOUT)
    assert not LOG_LINES.search(first.stdout), first.stdout
    lines = first.stdout.strip().splitlines()
    assert [line for line in lines if line.startswith("Epoch ")] == ["Epoch 1/2", "Epoch 2/2"]
    assert lines[-1].startswith("test accuracy ")
    assert lines[-1].endswith(f"; export {tmp_path / 'export' / '1'}")
    assert len(lines) == 5, first.stdout  # two epochs, a line each (not a terminal)

    again = run_recipe(*command, env=env, stderr=subprocess.STDOUT)
    assert again.stdout.strip().splitlines() == [
        f"{tmp_path} is a finished run (to train it again, delete its metrics.json): "
        + lines[-1]]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["1"]


def _config(**overrides):
    config = sentiment_config.get_config("smoke")
    config.update(overrides)
    return config


def test_mixed_bfloat16_trains_in_bfloat16_and_exports_the_float32_model(tmp_path):
    """`--config.dtype_policy=mixed_bfloat16`: the trained model's layers compute in bfloat16 on
    float32 weights; the export is the float32 model with those weights: its probabilities are
    the float32 model's from the best checkpoint, and its test accuracy is metrics.json's within
    the bfloat16 rounding of a few of the 256 reviews."""
    config = _config(dtype_policy="mixed_bfloat16", epochs=1, num_layers=2)  # (served by the model)
    model = train.training_model(config)
    _, bidirectional = models.first_layers(model)
    assert bidirectional.forward_layer.compute_dtype == "bfloat16"
    assert {w.dtype for w in model.weights} == {"float32"}
    exact = train.float32_model(model, config)
    assert exact is not model and exact.compute_dtype == "float32"
    for a, b in zip(exact.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert train.float32_model(exact, config) is exact
    ids = np.array([[5, 9, 3, 0], [7, 2, 0, 0]])
    assert model(ids).dtype == "float32"  # (the probability layer's policy: float32 output)

    workdir = tmp_path / "run"
    metrics = train.train_and_evaluate(config, str(workdir))
    exported = deploy.config_of(str(workdir / "export"))
    assert exported.dtype_policy == "mixed_bfloat16"
    scored = deploy.accuracy(str(workdir / "export"), exported, exported.test_split)
    assert scored["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=4 / 256)
    serve = tf.saved_model.load(str(workdir / "export" / "1")).signatures["serving_default"]
    served = serve(text=tf.constant(SERVING_INPUTS))["probability"].numpy()
    np.testing.assert_allclose(served, _keras_probabilities(workdir, SERVING_INPUTS), atol=1e-5)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left as it was


@pytest.mark.parametrize("overrides, message", [
    ({"dtype_policy": "mixed_float16"}, "--config.dtype_policy='mixed_float16' is invalid"),
    ({"dataset": "no_such_dataset"}, "unknown TFDS dataset 'no_such_dataset'"),
    ({"download": False, "data_dir": "{tmp}/empty"}, "set TFDS_DATA_DIR"),
    ({"batch_size": 0}, "--config.batch_size=0 is invalid"),
    ({"dropout": 1.5}, "--config.dropout=1.5 is invalid"),
    ({"lr_schedule": "linear"}, "--config.lr_schedule='linear' is invalid"),
    ({"model": "cnn"}, "--config.model='cnn' is invalid"),
    ({"model": "ngrams", "init_from": "runs/lm_imdb"}, "--config.init_from needs an LSTM"),
    ({"text_feature": "body"}, "not features of 'imdb_reviews'"),
    ({"train_split": "train[:abc]"}, "bad split"),
])
def test_bad_config_values(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
                 for k, v in overrides.items()}
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        train.train_and_evaluate(_config(**overrides), str(workdir))
    assert not workdir.exists()  # nothing half-written


@pytest.mark.parametrize("args, message", [
    (["--config=configs/sentiment.py:smoke", "--config.no_such_field=1"],
     "no field 'no_such_field' in the config"),
    (["--config.lstm_unitz=3"], "no field 'lstm_unitz' in the config (Did you mean"),
    (["--config.epochs=two"], "--config.epochs=two"),
    (["--no_such_flag"], "Unknown command line flag 'no_such_flag'"),
    (["--config=configs/sentiment.py:nope"], "unknown variant 'nope'"),
    (["--config=configs/no_such_file.py"], "No such file or directory"),
])
def test_bad_flags(args, message):
    # (A missing config file is an OSError, which the command line also reports in one line.)
    with pytest.raises((RecipeError, OSError)) as error:
        parse_config("sentiment", *args)
    assert message in str(error.value)
    assert error.type is OSError or "\n" not in str(error.value)  # (OSError: its last line)


def test_config_file_errors_are_told_apart_from_overrides(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config(arg=None):\n    return {}['missing']\n")
    with pytest.raises(RecipeError, match=r"the --config file raised KeyError: missing \(.*"
                                          r"broken.py, line 2\)"):
        parse_config("sentiment", f"--config={path}")


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(RecipeError, match="cannot write to workdir"):
        train.train_and_evaluate(_config(), str(blocker / "run"))


def test_predict_errors(tmp_path):
    with pytest.raises(RecipeError, match=f"no SavedModel in {tmp_path}"):
        deploy.print_predictions(str(tmp_path), ["text"])
    with pytest.raises(RecipeError, match="predict needs texts"):
        deploy.print_predictions(str(tmp_path), [])
