"""recipes.copy_task: generator, gradient-flow diagnostic, smoke run, export, sweep, errors."""

import csv
import json
import math
import os
import pty
import re
import resource
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from recipe_testing import (
    ROOT,
    assert_finished_run_stays_finished,
    assert_one_line_error,
    run_recipe,
    summary_tags,
)

import lstm_tf
from configs import copy_task as copy_config
from lstm_tf.diagnostics import state_gradient_norms
from recipes.common.errors import RecipeError
from recipes.copy_task import input_pipeline
from recipes.copy_task import model as models

SMOKE = ["--config=configs/copy_task.py:smoke"]


def _run(*args, **kwargs):
    return run_recipe("copy_task", *args, **kwargs)


def test_sequences_put_symbols_delimiter_and_copy_where_the_task_says():
    config = copy_config.get_config()
    symbols = tf.constant([[3, 1, 8, 2, 2, 5, 7, 1, 4, 6]], tf.int32)
    inputs, targets = (t.numpy()[0] for t in input_pipeline.make_batch(symbols, 100, 8))
    assert inputs.shape == targets.shape == (120,)
    np.testing.assert_array_equal(inputs[:10], symbols[0])
    assert not inputs[10:109].any() and inputs[109] == 9 and not inputs[110:].any()
    assert not targets[:110].any()
    np.testing.assert_array_equal(targets[110:], symbols[0])
    batches = input_pipeline.training_symbols(config)
    first, again = next(iter(batches)), next(iter(batches))
    np.testing.assert_array_equal(first, again)  # batch k is a function of (seed, k)
    assert first.shape == (config.batch_size, 10)
    symbols = first.numpy()
    assert symbols.min() >= 1 and symbols.max() <= 8 and len(np.unique(symbols)) == 8


def test_resumed_batches_continue_the_stream():
    """A run resumed after k batches trains on batch k next, as an uninterrupted run would."""
    config = copy_config.get_config("smoke")
    stream = list(input_pipeline.training_symbols(config).take(5))
    resumed = list(input_pipeline.training_symbols(config, first_batch=3).take(2))
    for symbols, expected in zip(resumed, stream[3:], strict=True):
        np.testing.assert_array_equal(symbols, expected)
    assert not np.array_equal(stream[0], stream[3])


def test_training_step_uses_the_delay_set_before_it():
    """A curriculum change applies from the very next step (no batch laid out in advance).

    Each step's loss (before its update) equals the model's loss on the batch laid
    out at the delay current when the step ran.
    """
    config = copy_config.get_config("smoke")
    model = models.create_model(config)
    model.compile(keras.optimizers.SGD(0.0),  # no update: the model stays the same
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    symbols = next(iter(input_pipeline.training_symbols(config)))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for delay in (7, 30, 12):
        model.curriculum_delay.assign(delay)
        reported = model.train_on_batch(symbols)
        inputs, targets = input_pipeline.make_batch(symbols, delay, config.num_symbols)
        assert reported == pytest.approx(float(loss(targets, model(inputs))), rel=1e-5)


def test_baseline_is_the_memoryless_cross_entropy():
    assert input_pipeline.baseline_loss(100) == pytest.approx(0.173, abs=5e-4)
    # The memoryless strategy: blank with certainty, then uniform over the symbols.
    config = copy_config.get_config()
    inputs, targets = input_pipeline.held_out(config)
    logits = np.full(targets.shape + (10,), -1e9, np.float32)
    logits[:, :110, 0] = 0.0
    logits[:, 110:, 1:9] = 0.0
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(targets, logits)
    assert float(loss) == pytest.approx(10 * math.log(8) / 120, rel=1e-5)


@pytest.mark.parametrize("layer_class", [lstm_tf.LSTM, keras.layers.SimpleRNN,
                                         keras.layers.GRU])
def test_state_gradient_norms_match_finite_differences(layer_class):
    """‖∂loss/∂h_t‖ against central differences through the layer's own call (float64)."""
    keras.utils.set_random_seed(0)
    layer = layer_class(4, return_sequences=True, dtype="float64")
    x = np.random.default_rng(0).normal(size=(2, 6, 3))
    y = layer(x)
    weights = np.random.default_rng(1).normal(size=y.shape)

    def loss_fn(outputs):
        return tf.reduce_sum(tf.cast(weights, outputs.dtype) * outputs ** 2)

    norms = state_gradient_norms(layer, x, loss_fn).numpy()
    for t in (0, 3, 5):
        # Outputs up to t, then perturb h_t and run the rest from (h_t + e, c_t).
        first = type(layer).from_config({**layer.get_config(), "return_state": True})
        first.build(x.shape)
        first.set_weights(layer.get_weights())
        out, *states = first(x[:, :t + 1])
        grad = np.zeros(states[0].shape)
        eps = 1e-6
        for idx in np.ndindex(*grad.shape):
            values = []
            for sign in (1, -1):
                h = states[0].numpy().copy()
                h[idx] += sign * eps
                prefix = tf.concat([out[:, :t], h[:, None]], axis=1)
                rest = first(x[:, t + 1:], initial_state=[h, *states[1:]])[0] \
                    if t + 1 < x.shape[1] else tf.zeros((2, 0, 4), tf.float64)
                values.append(float(loss_fn(tf.concat([prefix, rest], axis=1))))
            grad[idx] = (values[0] - values[1]) / (2 * eps)
        assert norms[t] == pytest.approx(np.linalg.norm(grad), rel=1e-4), t


def test_smoke_run_writes_metrics_diagnostics_and_summaries(copy_task_run):
    metrics = json.loads((copy_task_run / "metrics.json").read_text())
    assert metrics["eval"]["baseline"] == pytest.approx(10 * math.log(8) / 30)
    assert metrics["eval"]["loss_over_baseline"] == pytest.approx(
        metrics["eval"]["loss"] / metrics["eval"]["baseline"])
    assert metrics["steps"] == 20 and metrics["final_training_delay"] == 10
    assert metrics["seconds_per_step"] * metrics["steps"] < metrics["train_seconds"]
    # The run trained in this process (conftest): its peak lies between what TensorFlow alone
    # holds and this process's peak now.
    assert 100 < metrics["peak_rss_mib"] <= resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024 + 1
    diagnostics = json.loads((copy_task_run / "diagnostics.json").read_text())
    assert len(diagnostics["gradient_flow"]) == len(diagnostics["forget_gate_mean"]) == 30
    for name in ("gradient_flow.png", "forget_gate.png"):
        assert tf.image.decode_png((copy_task_run / name).read_bytes()).shape[-1] >= 3, name
    tags = summary_tags(copy_task_run / "tensorboard")
    assert {"train_loss", "eval_loss", "eval_baseline", "eval_copied_accuracy", "train_delay",
            "gradient_flow", "forget_gate", "steps/train_loss"} <= tags, tags


def test_a_finished_run_stays_finished(copy_task_run, capsys):
    assert_finished_run_stays_finished("copy_task", "smoke", copy_task_run, capsys)


@pytest.mark.slow
def test_progress_bar_within_the_epoch_on_a_terminal(tmp_path):
    """On a terminal Keras's bar shows the steps as they go (` 1/10 ━━...`, redrawn after a
    `\\r`); a log file gets one line per epoch (see test_sentiment's console test)."""
    terminal, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "recipes.copy_task", f"--workdir={tmp_path}",
                             "--config=configs/copy_task.py:smoke"], cwd=ROOT, stdout=child,
                            stderr=subprocess.DEVNULL)
    os.close(child)
    output = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # (EIO: the process has closed the terminal)
            break
        if not chunk:
            break
        output += chunk
    os.close(terminal)
    assert proc.wait() == 0
    shown = re.sub(r"\x1b\[[0-9;]*m", "", output.decode())  # (without the bar's colours)
    steps = copy_config.get_config("smoke").steps_per_epoch
    assert re.search(rf"\r *1/{steps} ", shown), shown[:2000]  # (the bar after step 1)


def test_export_predicts_in_fresh_process(copy_task_run):
    """The export, served without this project's code, predicts as the trained model."""
    config = copy_config.get_config("smoke")
    inputs, _ = input_pipeline.held_out(config)
    model = models.create_model(config)
    model.load_weights(copy_task_run / "checkpoints" / "best.weights.h5")
    expected = np.argmax(model(inputs[:3]), axis=-1)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, tensorflow as tf
        serve = tf.saved_model.load({str(copy_task_run / "export" / "1")!r}).signatures[
            "serving_default"]
        out = serve(inputs=tf.constant({inputs[:3].tolist()}, tf.int32))["predictions"]
        assert not [m for m in sys.modules if m.startswith(("lstm_tf", "recipes"))]
        print(json.dumps({{"predictions": out.numpy().tolist(), "dtype": out.dtype.name}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd="/")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "int32"
    np.testing.assert_array_equal(out["predictions"], expected)


def test_sweep_writes_table_and_plots(tmp_path):
    from recipes.copy_task import sweep

    config = copy_config.get_config("smoke")
    config.max_epochs = 1
    sweep.sweep(config, str(tmp_path), ["3", "6"], ["lstm", "rnn"])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["cell"], r["delay"]) for r in rows] == [
        ("lstm", "3"), ("lstm", "6"), ("rnn", "3"), ("rnn", "6")]
    for row in rows:  # the table holds each pair's own metrics
        metrics = json.loads((tmp_path / f"{row['cell']}_T{row['delay']}" / "metrics.json")
                             .read_text())
        assert float(row["eval_loss"]) == round(metrics["eval"]["loss"], 4)
        assert int(row["steps"]) == metrics["steps"] == 10
    assert (tmp_path / "results.md").read_text().count("\n") == 6
    for png in ("results.png", "accuracy.png", "gradient_flow.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mtime = (tmp_path / "lstm_T3" / "metrics.json").stat().st_mtime
    sweep.sweep(config, str(tmp_path), ["3"], ["lstm"])
    assert (tmp_path / "lstm_T3" / "metrics.json").stat().st_mtime == mtime  # not retrained


def test_command_line(copy_task_run, tmp_path):
    """The entry point: `predict` shows held-out copies; a mistake is one `error:` line."""
    proc = _run("predict", f"--model={copy_task_run / 'export'}", *SMOKE)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("symbols ") for line in lines)
    proc = _run(f"--workdir={tmp_path / 'run'}", *SMOKE, "--config.delay=0", check=False)
    assert_one_line_error(proc, "--config.delay=0 is invalid")


def test_predict_lays_out_sequences_as_the_run_did(copy_task_run):
    """`predict` uses the model's run's config (delay, symbols), not the command line's."""
    from recipes.copy_task import deploy as copy_deploy

    default, smoke = copy_config.get_config(), copy_config.get_config("smoke")
    assert default.delay != smoke.delay and default.units != smoke.units
    for model in (copy_task_run / "export", copy_task_run / "export" / "1"):
        config = copy_deploy.config_of(str(model), default)
        assert (config.delay, config.units) == (smoke.delay, smoke.units)
    assert copy_deploy.config_of("/elsewhere/model.tflite", default) is default


@pytest.mark.parametrize("overrides, message", [
    ({"delay": 0}, "--config.delay=0 is invalid"),
    ({"delay": -5}, "--config.delay=-5 is invalid"),
    ({"cell": "transformer"}, "--config.cell='transformer' is invalid"),
    ({"cell": "rnn", "chrono": True}, "--config.chrono=True needs"),
])
def test_bad_config_values(tmp_path, overrides, message):
    from recipes.copy_task import train

    config = copy_config.get_config("smoke")
    config.update(overrides)
    with pytest.raises(RecipeError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("delays, cells, message", [
    (["10", "x"], ["lstm"], "must be integers"),
    (["0"], ["lstm"], "must be positive"),
    (["10"], ["lstm", "tcn"], "unknown cell 'tcn'"),
])
def test_bad_sweep_flags(tmp_path, delays, cells, message):
    from recipes.copy_task import sweep

    with pytest.raises(RecipeError, match=message):
        sweep.sweep(copy_config.get_config("smoke"), str(tmp_path), delays, cells)


def test_deploy_refuses_other_cells(tmp_path):
    from recipes.copy_task import deploy

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.weights.h5").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"cell": "rnn"}))
    with pytest.raises(RecipeError, match="export is for the LSTM"):
        deploy.export(str(tmp_path), ["tflite"])
