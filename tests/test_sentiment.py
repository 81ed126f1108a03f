"""recipes.sentiment end to end on the smoke config: files, TensorBoard, export, serving, errors."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from recipe_testing import ROOT, assert_one_line_error, run_recipe, summary_tags

SMOKE = ["--config=configs/sentiment.py:smoke"]
SERVING_INPUTS = ["", "   \t\n", "great " * 20000, "我爱中国", "😀🎬👍",
                  "A wonderful, moving film.", "Dreadful. The worst acting I have ever seen."]


def _run(*args, **kwargs):
    return run_recipe("sentiment", *args, **kwargs)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sentiment")
    _run(f"--workdir={workdir}", *SMOKE)
    return workdir


def test_workdir_contents(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    for split in ("train", "validation", "test"):
        assert 0.0 <= metrics[split]["accuracy"] <= 1.0
        assert np.isfinite(metrics[split]["loss"])
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["train_split"] == "train[:512]"
    assert (smoke_run / "checkpoints" / "best.weights.h5").exists()
    assert not (smoke_run / "backup").exists()  # BackupAndRestore cleans up on success
    assert [p.name for p in (smoke_run / "export").iterdir()] == ["1"]
    assert metrics["export"] == str(smoke_run / "export" / "1")


def test_tensorboard_tags(smoke_run):
    tags = summary_tags(smoke_run / "tensorboard")
    expected = {"epoch_loss", "epoch_accuracy", "epoch_learning_rate",
                "train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "learning_rate",
                "_hparams_/session_start_info"}
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


def test_export_serves_in_fresh_process(smoke_run, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        texts = json.loads(sys.stdin.read())
        loaded = tf.saved_model.load({str(smoke_run / "export" / "1")!r})
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
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    batch = np.array(out["batch"])
    assert batch.shape == (len(SERVING_INPUTS),)
    assert np.all((batch >= 0) & (batch <= 1))
    np.testing.assert_array_equal(out["label"], (batch >= 0.5).astype(int))
    np.testing.assert_allclose(out["single"], batch, atol=1e-5)  # padding changes nothing
    np.testing.assert_allclose(batch, _keras_probabilities(smoke_run, SERVING_INPUTS), atol=1e-5)


def test_saved_model_cli_shows_signature(smoke_run):
    cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
    proc = subprocess.run([str(cli), "show", "--dir", str(smoke_run / "export" / "1"),
                           "--tag_set", "serve", "--signature_def", "serving_default"],
                          capture_output=True, text=True, check=True)
    assert "inputs['text'] tensor_info:" in proc.stdout
    assert "dtype: DT_STRING" in proc.stdout
    assert "outputs['probability'] tensor_info:" in proc.stdout
    ops = subprocess.run([str(cli), "show", "--dir", str(smoke_run / "export" / "1"), "--all"],
                         capture_output=True, text=True, check=True).stdout
    assert "Cudnn" not in ops


def test_predict_command(smoke_run):
    proc = _run("predict", f"--export_dir={smoke_run / 'export'}", "Loved it!", "")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        label, probability, _ = line.split("\t")
        assert label in ("positive", "negative")
        assert 0.0 <= float(probability) <= 1.0


@pytest.mark.parametrize("args, message", [
    (["--config.dataset=no_such_dataset"], "unknown TFDS dataset 'no_such_dataset'"),
    (["--config.download=False", "--config.data_dir={tmp}/empty"], "set TFDS_DATA_DIR"),
    (["--config.batch_size=0"], "--config.batch_size=0 is invalid"),
    (["--config.dropout=1.5"], "--config.dropout=1.5 is invalid"),
    (["--config.text_feature=body"], "not features of 'imdb_reviews'"),
    (["--config.train_split=train[:abc]"], "bad split"),
    (["--config.no_such_field=1"], "no field 'no_such_field' in the config"),
    (["--config.epochs=two"], "--config.epochs=two"),
    (["--no_such_flag"], "Unknown command line flag 'no_such_flag'"),
])
def test_bad_input_gives_one_line_error(tmp_path, args, message):
    workdir = tmp_path / "run"
    args = [a.format(tmp=tmp_path) for a in args]
    proc = _run(f"--workdir={workdir}", *SMOKE, *args, check=False)
    assert_one_line_error(proc, message)
    assert not workdir.exists()  # nothing half-written


@pytest.mark.parametrize("config, message", [
    ("configs/sentiment.py:nope", "unknown variant 'nope'"),
    ("configs/no_such_file.py", "No such file or directory"),
])
def test_bad_config_file_gives_one_line_error(tmp_path, config, message):
    proc = _run(f"--workdir={tmp_path / 'run'}", f"--config={config}", check=False)
    assert_one_line_error(proc, message)


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = _run(f"--workdir={blocker / 'run'}", *SMOKE, check=False)
    assert_one_line_error(proc, "cannot write to workdir")


def test_predict_without_export(tmp_path):
    proc = _run("predict", f"--export_dir={tmp_path}", "text", check=False)
    assert_one_line_error(proc, f"no SavedModel in {tmp_path}")


def test_default_config_found_from_any_directory(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "recipes.sentiment", "--config.batch_size=0",
                           f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert "--config.batch_size=0 is invalid" in proc.stderr  # config loaded, then validated
