"""The fused path against the step-by-step path: same outputs, states and gradients."""

import re

import numpy as np
import pytest
import tensorflow as tf

import lstm_tf
from lstm_tf import cpu_kernel
from lstm_tf import fused as fused_lib

B, T, D, U = 4, 9, 6, 5  # T not a multiple of the unroll factor


@pytest.fixture(autouse=True, params=["cpu kernel", "XLA loops"])
def training_loops(request, monkeypatch):
    """Every test on both implementations of the training path's loops."""
    if request.param == "cpu kernel":
        assert cpu_kernel.ops() is not None, "the CPU kernel did not build here"
    else:
        monkeypatch.setenv("LSTM_TF_KERNEL", "0")
    return request.param


def _pair(make, x):
    """The same layer on the step path and on the fused path, same random weights."""
    step, fused = make(False), make(True)
    step(x)
    fused(x)
    rng = np.random.default_rng(1)
    step.set_weights([rng.normal(scale=0.5, size=w.shape).astype(w.dtype)
                      for w in step.get_weights()])
    fused.set_weights(step.get_weights())
    return step, fused


def _outputs_and_gradients(layer, x, mask, initial_state, training):
    """Eager for inference calls, in a tf.function (as `fit` runs) for training calls."""
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            kwargs = {} if initial_state is None else {"initial_state": initial_state}
            out = tf.nest.flatten(layer(x, mask=mask, training=training, **kwargs))
            loss = sum(tf.reduce_sum(tf.sin(o * (k + 1.0))) for k, o in enumerate(out))
        return out, tape.gradient(loss, [x, *layer.trainable_variables])

    return (tf.function(run) if training else run)(tf.constant(x))


@pytest.mark.parametrize("direction", ["forward", "backward", "bidirectional"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_fused_equals_step_path(direction, masked, with_state, training):
    # (not go_backwards with Bidirectional, which sets the directions itself)
    bidirectional, go_backwards = direction == "bidirectional", direction == "backward"

    def make(fused):
        layer = lstm_tf.LSTM(U, return_sequences=True, return_state=True,
                             go_backwards=go_backwards, fused=fused)
        return lstm_tf.Bidirectional(layer) if bidirectional else layer

    x = np.random.default_rng(0).normal(size=(B, T, D)).astype("float32")
    step, fused = _pair(make, x)
    mask = np.arange(T)[None] < np.array([T, 5, 1, 0])[:, None] if masked else None
    state = None
    if with_state:
        rng = np.random.default_rng(2)
        n_states = 4 if bidirectional else 2
        state = [rng.normal(size=(B, U)).astype("float32") for _ in range(n_states)]
    out_s, grad_s = _outputs_and_gradients(step, x, mask, state, training)
    out_f, grad_f = _outputs_and_gradients(fused, x, mask, state, training)
    for a, b in zip(out_s + grad_s, out_f + grad_f, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_auto_picks_the_fused_path_when_it_applies():
    for units in (1, U, 64, 128, 255, 512):
        assert lstm_tf.LSTM(units).uses_fused_path()
        assert lstm_tf.LSTM(units).uses_fused_path(training=False)
        assert lstm_tf.LSTM(units, fused=True).uses_fused_path()
        assert not lstm_tf.LSTM(units, fused=False).uses_fused_path(training=False)
        assert lstm_tf.LSTM(units, dtype="mixed_bfloat16").uses_fused_path()
        assert lstm_tf.LSTM(units, dtype="float64").uses_fused_path()
    assert not lstm_tf.LSTM(U, recurrent_dropout=0.1).uses_fused_path()
    assert lstm_tf.LSTM(U, recurrent_dropout=0.1).uses_fused_path(training=False)
    assert not lstm_tf.LSTM(U, activation="relu").uses_fused_path()
    with pytest.raises(ValueError, match="fused=True needs"):
        lstm_tf.LSTM(U, recurrent_dropout=0.1, fused=True)


# Real steps: first (right-padded), after padding (left-padded), with holes, none.
ANY_MASK = np.array([[1, 1, 1, 1, 1, 1, 0, 0, 0],
                     [0, 0, 0, 1, 1, 1, 1, 1, 1],
                     [1, 0, 1, 1, 0, 0, 1, 0, 1],
                     [0, 0, 0, 0, 0, 0, 0, 0, 0]], bool)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("make", [
    lambda fused: lstm_tf.LSTM(U, return_sequences=True, return_state=True, fused=fused),
    lambda fused: lstm_tf.LSTM(U, return_sequences=True, go_backwards=True, fused=fused),
    lambda fused: lstm_tf.LSTM(U, fused=fused),
    lambda fused: lstm_tf.Bidirectional(lstm_tf.LSTM(U, return_sequences=True, fused=fused)),
], ids=["states", "go_backwards", "last_output", "bidirectional"])
def test_any_mask_equals_the_step_path(make, training):
    """Masks that are not right-padded: the fused path moves the real steps first."""
    x = np.random.default_rng(0).normal(size=(B, T, D)).astype("float32")
    step, fused = _pair(make, x)
    assert step.__class__ is fused.__class__
    out_s, grad_s = _outputs_and_gradients(step, x, ANY_MASK, None, training)
    out_f, grad_f = _outputs_and_gradients(fused, x, ANY_MASK, None, training)
    for a, b in zip(out_s + grad_s, out_f + grad_f, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("make", [
    lambda fused: lstm_tf.LSTM(U, return_sequences=True, return_state=True, fused=fused),
    lambda fused: lstm_tf.Bidirectional(lstm_tf.LSTM(U, return_sequences=True, fused=fused)),
])
def test_zero_step_batches(make, fused):
    """tf.distribute gives replicas without data in a step `(0, 0, features)` batches."""
    layer = make(fused)
    call = tf.function(lambda x: layer(x, training=True),
                       input_signature=[tf.TensorSpec([None, None, D])])
    for steps in (0, 3):
        x = tf.zeros((0, steps, D))
        with tf.GradientTape() as tape:
            outputs = tf.nest.flatten(call(x))
            loss = sum(tf.reduce_sum(o) for o in outputs)
        assert outputs[0].shape[:2] == (0, steps)
        gradients = tape.gradient(loss, layer.trainable_weights)
        assert all(g is not None and not np.any(g.numpy()) for g in gradients)


@pytest.mark.parametrize("final_cell", [True, False])
def test_inference_gradient_equals_the_training_path(final_cell):
    """`fused.inference`'s gradient (through the training path) = `fused.run`'s, for H and
    for C (C_T, or C_0 itself without `final_cell`)."""
    from lstm_tf import fused

    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(B, T, D)), tf.float32)
    weights = [tf.constant(rng.normal(scale=0.5, size=s), tf.float32)
               for s in ((D, 4 * U), (U, 4 * U), (4 * U,))]
    h0, c0 = (tf.constant(rng.normal(size=(B, U)), tf.float32) for _ in range(2))
    lengths = tf.constant([T, 5, 1, 0])

    def gradients(run):
        with tf.GradientTape() as tape:
            tape.watch([x, h0, c0, *weights])
            hs, c = run()
            loss = tf.reduce_sum(tf.sin(hs)) + tf.reduce_sum(tf.cos(2.0 * c))
        return tape.gradient(loss, [x, h0, c0, *weights])

    kernel, recurrent_kernel, bias = weights

    def reference():
        xw = tf.einsum("btd,dg->tbg", x, kernel)
        hs, _, c = fused.recurrence(xw, lengths, h0, c0, recurrent_kernel, bias)
        return tf.transpose(hs, [1, 0, 2]), c if final_cell else c0

    def inference():
        hs, _, c = fused.inference(x, kernel, lengths, h0, c0, recurrent_kernel, bias,
                                   final_cell=final_cell)
        return hs, c

    for a, b in zip(gradients(reference), gradients(inference), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_sequences_longer_than_a_chunk(training):
    """The fused loops run in chunks of `TIME_BUCKET` steps, the state carried across."""
    from lstm_tf import fused

    steps = 2 * fused.TIME_BUCKET + 3
    x = np.random.default_rng(0).normal(size=(B, steps, D)).astype("float32")
    mask = np.arange(steps)[None] < np.array([steps, fused.TIME_BUCKET + 1, 1, 0])[:, None]
    step, fused_layer = _pair(lambda f: lstm_tf.Bidirectional(lstm_tf.LSTM(
        U, return_sequences=True, return_state=True, fused=f)), x)
    out_s, grad_s = _outputs_and_gradients(step, x, mask, None, training)
    out_f, grad_f = _outputs_and_gradients(fused_layer, x, mask, None, training)
    for a, b in zip(out_s + grad_s, out_f + grad_f, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy, tolerance", [("mixed_bfloat16", 2e-2), ("mixed_float16", 3e-3)])
@pytest.mark.parametrize("fused", ["auto", False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_mixed_precision_matches_float32(policy, tolerance, fused, bidirectional, training):
    """Compute-dtype outputs and states, float32 weights and gradients, float32's values."""
    def make(dtype):
        layer = lstm_tf.LSTM(U, return_sequences=True, return_state=True, fused=fused,
                             dtype=dtype)
        return lstm_tf.Bidirectional(layer, dtype=dtype) if bidirectional else layer

    steps = 40
    x = np.random.default_rng(0).normal(size=(B, steps, D)).astype("float32")
    mask = np.arange(steps)[None] < np.array([steps, 25, 1, 0])[:, None]
    mixed, exact = make(policy), make("float32")
    mixed(x)
    exact(x)
    rng = np.random.default_rng(1)
    exact.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32")
                       for w in exact.get_weights()])
    mixed.set_weights(exact.get_weights())
    assert all(w.dtype == "float32" for w in mixed.weights)

    def run(layer, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, mask=mask, training=training)
            loss = sum(tf.reduce_sum(tf.sin(tf.cast(o, tf.float32) * (k + 1.0)))
                       for k, o in enumerate(out))
        return out, tape.gradient(loss, [x, *layer.trainable_variables])

    call = tf.function(run) if training else run  # (as in `_outputs_and_gradients`)
    out_m, grad_m = call(mixed, tf.constant(x))
    out_e, grad_e = call(exact, tf.constant(x))
    assert {o.dtype.name for o in out_m} == {policy.removeprefix("mixed_")}
    assert all(g.dtype == tf.float32 for g in grad_m)
    for a, b in zip(out_m, out_e, strict=True):
        np.testing.assert_allclose(tf.cast(a, tf.float32), b, atol=tolerance)
    for a, b in zip(grad_m, grad_e, strict=True):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())


def test_no_loop_compiles_per_sequence_length():
    """Every argument of each XLA-compiled loop stays a parameter of its compiled program:
    none is folded in as a compile-time constant, so batches of any length within a bucket
    of `TIME_BUCKET` steps share one compilation (XLA compiles once per constant value)."""
    steps, m = 7, 3
    padded = fused_lib._bucketed(steps)
    lengths, steps, h = tf.constant([7, 2, 5, 0]), tf.constant(steps), tf.zeros([4, m])
    kernel, bias = tf.zeros([m, 4 * m]), tf.zeros([4 * m])
    by_time, gates = tf.zeros([padded, 4, m]), tf.zeros([padded, 4, 4 * m])
    compiled = fused_lib._compiled(m)
    calls = {
        "forward": (compiled.forward, (gates, steps, h, h, kernel, bias)),
        "backward": (compiled.backward,
                     (by_time, h, h, steps, lengths, by_time, gates, h, kernel)),
        "infer": (compiled.infer_final_cell,
                  (tf.transpose(gates, [1, 0, 2]), lengths, h, h, kernel, bias, steps)),
        "pool": (compiled.pool, (gates, lengths, kernel)),
    }
    for name, (function, args) in calls.items():
        options = {"final_cell": True} if name == "infer" else {}  # (a functools.partial)
        hlo = function.experimental_get_compiler_ir(*args, **options)(stage="hlo")
        entry = hlo[hlo.index("\nENTRY"):]
        parameters = set(re.findall(r"parameter\((\d+)\)", entry[:entry.index("\n}")]))
        assert len(parameters) == len(args), name
