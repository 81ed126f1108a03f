"""The CPU kernel (`lstm_tf/cpu_kernel.cc`) against the XLA loops it stands in for, and its
build: cached, atomic, and the layers training without it where it cannot be built.

(The layers on the kernel against the step path: tests/test_fused.py, which runs each of its
tests on the kernel and on the XLA loops.)"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from lstm_tf import LSTM, Bidirectional, cpu_kernel
from lstm_tf import fused as fused_lib


def _inputs(units, steps=9, padded=32, batch=5, seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return tf.constant(rng.normal(scale=scale, size=shape), tf.float32)

    xw = normal(padded, batch, 4 * units)
    h0, c0 = normal(batch, units), normal(batch, units)
    kernel, bias = normal(units, 4 * units, scale=0.3), normal(4 * units, scale=0.3)
    lengths = tf.constant([steps, 4, 1, 0, steps - 1][:batch], tf.int32)
    return xw, tf.constant(steps), lengths, h0, c0, kernel, bias


@pytest.mark.parametrize("batch_major", [False, True], ids=["time-major", "batch-major"])
@pytest.mark.parametrize("units, threads", [(5, 1), (50, 1), (50, 2), (50, 3), (64, 0)])
def test_the_kernel_equals_the_xla_loops(units, threads, batch_major):
    """Forward (h, C and gates of every step) and backward (dz, dh0, dc0, db), with
    sequences of every kind of length, the units in one slice or shared among threads,
    on time-major arrays as the XLA loops take them or batch-major ones."""
    ops = cpu_kernel.ops()
    assert ops is not None, "the kernel did not build here (see lstm_tf.cpu_kernel's log)"
    kernel_loops = fused_lib._Kernel(ops, threads)
    xla = fused_lib._compiled(units)

    def layout(t):  # [T, B, ·] to the kernel's layout, and back
        return tf.transpose(t, [1, 0, 2]) if batch_major and t.shape.rank == 3 else t

    xw, steps, lengths, h0, c0, kernel, bias = _inputs(units)
    expected = xla.forward(xw, steps, h0, c0, kernel, bias)
    got = kernel_loops.forward(layout(xw), steps, h0, c0, kernel, bias, batch_major=batch_major)
    for a, b in zip(map(layout, got), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    hs, cs, gates = expected
    rng = np.random.default_rng(1)
    d_hs = tf.constant(rng.normal(size=hs.shape), tf.float32)
    d_h, d_c = (tf.constant(rng.normal(size=h0.shape), tf.float32) for _ in range(2))
    args = (d_hs, d_h, d_c, steps, lengths, cs, gates, c0, kernel)
    expected = xla.backward(*args)
    got = kernel_loops.backward(*map(layout, args), batch_major=batch_major)
    for a, b in zip(map(layout, got), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_threads_per_step(monkeypatch):
    """All threads share a step from 128 units on; a smaller one, or one of two running
    side by side (a Bidirectional's directions in training), keeps to one."""
    def threads(units):
        return fused_lib._training_loops(tf.zeros([2, units]))._threads

    assert (threads(64), threads(128)) == (1, 0)
    with fused_lib.side_by_side():
        assert threads(128) == 1
    assert threads(128) == 0
    chosen, choose = [], fused_lib._training_loops
    monkeypatch.setattr(fused_lib, "_training_loops",
                        lambda h0: chosen.append(choose(h0)) or chosen[-1])
    Bidirectional(LSTM(128))(tf.ones([2, 3, 4]), training=True)
    assert [loops._threads for loops in chosen] == [1, 1]


def test_no_steps():
    ops = cpu_kernel.ops()
    xw, _, lengths, h0, c0, kernel, bias = _inputs(20)
    hs, cs, gates = ops.lstm_tf_forward(xw, 0, h0, c0, kernel, bias)
    assert not np.any(hs.numpy()) and not np.any(cs.numpy()) and not np.any(gates.numpy())
    for gradient in ops.lstm_tf_backward(hs, h0, c0, 0, lengths, cs, gates, c0, kernel):
        assert not np.any(gradient.numpy())


_TRAIN = """
import keras, numpy as np, tensorflow as tf, lstm_tf
from lstm_tf import cpu_kernel
keras.utils.set_random_seed(0)
layer = lstm_tf.LSTM(8)
x = tf.constant(np.random.default_rng(0).normal(size=(2, 5, 3)), tf.float32)
with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.function(lambda x: layer(x, training=True))(x))
grads = tape.gradient(loss, layer.trainable_weights)
print("kernel" if cpu_kernel.ops() else "none", float(sum(tf.reduce_sum(g) for g in grads)))
"""


def _train_in_fresh_process(cache, **env):
    proc = subprocess.run([sys.executable, "-c", _TRAIN], capture_output=True, text=True,
                          env={**os.environ, "LSTM_TF_CACHE": str(cache), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    which, gradient = proc.stdout.split()
    return which, float(gradient)


@pytest.mark.slow
def test_built_once_into_the_cache_and_the_layers_train_without_it(tmp_path):
    """A fresh cache: built there (nothing else left behind) and loaded again as built; with
    no compiler, the layers train on the XLA loops, to the same gradients."""
    cache = tmp_path / "cache"
    built = _train_in_fresh_process(cache)
    assert built[0] == "kernel"
    [library] = cache.glob("*.so")
    assert sorted(p.name for p in cache.iterdir()) == [library.name, f"{library.name}.lock"]
    stamp = library.stat().st_mtime_ns
    assert _train_in_fresh_process(cache) == built
    assert library.stat().st_mtime_ns == stamp  # loaded, not built again
    which, gradient = _train_in_fresh_process(tmp_path / "other", CXX="false")
    assert which == "none" and not list((tmp_path / "other").glob("*.so"))
    np.testing.assert_allclose(gradient, built[1], rtol=1e-5)
