"""recipes.copy_task: generator, gradient-flow diagnostic, smoke run, export, sweep, errors."""

import csv
import json
import math
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from recipe_testing import assert_one_line_error, run_recipe, summary_tags

import lstm_tf
from configs import copy_task as copy_config
from lstm_tf.diagnostics import state_gradient_norms
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


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("copy_task")
    _run(f"--workdir={workdir}", *SMOKE)
    return workdir


def test_smoke_run_writes_metrics_diagnostics_and_summaries(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["eval"]["baseline"] == pytest.approx(10 * math.log(8) / 30)
    assert 0 <= metrics["eval"]["copied_accuracy"] <= 1
    assert metrics["steps"] == 20 and metrics["final_training_delay"] == 10
    diagnostics = json.loads((smoke_run / "diagnostics.json").read_text())
    assert len(diagnostics["gradient_flow"]) == len(diagnostics["forget_gate_mean"]) == 30
    tags = summary_tags(smoke_run / "tensorboard")
    assert {"train_loss", "eval_loss", "eval_baseline", "eval_copied_accuracy", "train_delay",
            "gradient_flow", "forget_gate"} <= tags, tags


def test_export_predicts_in_fresh_process(smoke_run):
    script = textwrap.dedent(f"""
        import json
        import numpy as np, tensorflow as tf
        serve = tf.saved_model.load({str(smoke_run / "export" / "1")!r}).signatures[
            "serving_default"]
        inputs = np.zeros((3, 30), np.int32); inputs[:, :10] = 5; inputs[:, 19] = 9
        out = serve(inputs=tf.constant(inputs))["predictions"]
        print(json.dumps({{"shape": out.shape.as_list(), "dtype": out.dtype.name}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd="/")
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"shape": [3, 30],
                                                                "dtype": "int32"}


def test_sweep_writes_table_and_plots(tmp_path):
    _run("sweep", f"--workdir={tmp_path}", "--delays=3,6", "--cells=lstm,rnn", *SMOKE,
         "--config.max_epochs=1")
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["cell"], r["delay"]) for r in rows] == [
        ("lstm", "3"), ("lstm", "6"), ("rnn", "3"), ("rnn", "6")]
    assert all(float(r["seconds_per_step"]) > 0 for r in rows)
    assert (tmp_path / "results.md").read_text().count("\n") == 6
    for png in ("results.png", "accuracy.png", "gradient_flow.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mtime = (tmp_path / "lstm_T3" / "metrics.json").stat().st_mtime
    _run("sweep", f"--workdir={tmp_path}", "--delays=3", "--cells=lstm", *SMOKE)
    assert (tmp_path / "lstm_T3" / "metrics.json").stat().st_mtime == mtime  # not retrained


@pytest.mark.parametrize("args, message", [
    (["--config.delay=0"], "--config.delay=0 is invalid"),
    (["--config.delay=-5"], "--config.delay=-5 is invalid"),
    (["--config.cell=transformer"], "--config.cell='transformer' is invalid"),
    (["--config.cell=rnn", "--config.chrono=True"], "--config.chrono=True needs"),
    (["sweep", "--delays=10,x"], "must be integers"),
    (["sweep", "--delays=0"], "must be positive"),
    (["sweep", "--cells=lstm,tcn"], "unknown cell 'tcn'"),
    (["predict"], "unknown command 'predict'"),
])
def test_bad_values_give_one_line_error(tmp_path, args, message):
    proc = _run(f"--workdir={tmp_path / 'run'}", *SMOKE, *args, check=False)
    assert_one_line_error(proc, message)
