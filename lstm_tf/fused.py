"""The fused LSTM sequence path: the same maths as `LSTMCell`, fewer, cheaper ops.

What it does to be fast on a CPU (the speed it reaches against `keras.layers.LSTM` and
`torch.nn.LSTM`: `benchmarks/lstm_throughput.py`, docs/benchmarks.md):

* The input projection x_t·W of every step is one large 2-D matmul before
  the loop; only h_{t-1}·U (and the bias) stays inside it.
* The loops are compiled by XLA (`tf.function(jit_compile=True)`), which
  fuses each step's element-wise work into a few passes instead of a dozen
  TensorFlow ops, each with its own dispatch (per-step op overhead, not
  arithmetic, is what a plain `tf.while_loop` spends its time on); one sigmoid over all
  four gates (tanh(z) = 2σ(2z) - 1 for the candidate).
* A hand-written gradient (`tf.custom_gradient`) for the whole recurrence: the
  forward loop keeps the gate activations it computed anyway; the backward
  loop is the element-wise chain rule and dz_t·Uᵀ; the weight gradients
  Σ_t h_{t-1}ᵀ·dz_t and Σ_t x_tᵀ·dz_t are one matmul each after the loop.
  For inference nothing is kept (and a gradient, if one is asked for anyway,
  recomputes the forward pass).
* Masks become per-sequence lengths: the loop runs unmasked and the final
  state is taken at each sequence's last real step; the backward direction
  reads each sequence reversed up to its length (`reverse_real_steps`). A
  mask that is not right-padded has each sequence's real steps gathered to the
  front first (`run`).
* The backward loop does one element-wise pass and one matmul per step: each
  step's factors of the chain rule come from its kept gates and C_t in that
  pass (nothing as long as the sequence is computed before the loop).
* The time axis is padded to a multiple of `TIME_BUCKET` steps (the loops stop
  at the real length), so that XLA compiles once per batch size and bucket of
  lengths rather than once per length.
* In training on a CPU the two loops are the CPU kernel's ops (`cpu_kernel.py`)
  where it loads, on the layers' batch-major arrays as they are (no transposes,
  no padding).
* A `Bidirectional`'s two directions are two independent loops in one graph,
  which TensorFlow runs concurrently (`side_by_side`).
* For a classifier that mean- and max-pools an LSTM's outputs,
  `pooled_inference` pools inside the loop (no per-step outputs at all), from
  x_t·W + b computed by the caller (e.g. looked up in a table folded from an
  embedding: `recipes/sentiment/serving.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

from lstm_tf import cpu_kernel

_side_by_side = contextvars.ContextVar("lstm_tf.fused side_by_side", default=False)


def recurrence(xw: tf.Tensor, lengths: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor,
               recurrent_kernel: tf.Tensor, bias: tf.Tensor) -> tuple:
    """All hidden states of one LSTM of M units, and its final state, for training.

    The loop keeps the gate activations for its hand-written gradient.

    Args:
        xw: `[T, B, 4M]`, x_t·W for every step (gate order i, f, c, o).
        lengths: `[B]` int32, the number of real steps of each sequence.
        h0, c0: `[B, M]` initial states.
        recurrent_kernel: `[M, 4M]`.
        bias: `[4M]` (added inside the loop, where it costs nothing).

    Returns:
        `(H, h, C)`: H `[T, B, M]` h_t after every step; h, C `[B, M]` the state
        after each sequence's last real step (the initial state for length 0).
    """
    steps = tf.shape(xw)[0]
    xw = tf.pad(xw, [[0, _bucketed(steps) - steps], [0, 0], [0, 0]])
    hs, h, c = _BUCKETED_RECURRENCE[False](xw, steps, lengths, h0, c0, recurrent_kernel, bias)
    return _first_steps(hs, steps), h, c


def _bucketed_recurrence(bfloat16_gradient: bool) -> Any:
    """`recurrence` on `xw` padded to a multiple of `TIME_BUCKET` steps, `steps` of them real.

    (One compilation per bucket of lengths: XLA compiles for each shape, and a
    training set's batches come in many lengths. The loops stop at `steps`.)
    `bfloat16_gradient`: the recurrent kernel's gradient Σ_t h_{t-1}ᵀ·dz_t from
    bfloat16 inputs (under a `mixed_bfloat16` policy; it accumulates in float32).
    """
    # (The compiled functions are called on `tf.stop_gradient`-ed inputs: a
    # gradient tape would otherwise ask TensorFlow to differentiate them itself,
    # which it cannot do through XLA's while loops; `tf.custom_gradient` supplies
    # the gradient instead.)
    @tf.custom_gradient
    def bucketed(xw, steps, lengths, h0, c0, recurrent_kernel, bias):  # noqa: ANN001, ANN202
        loops = _training_loops(h0)
        hs, cs, gates = loops.forward(*_unwatched(xw, steps, h0, c0, recurrent_kernel, bias))
        h, c = (final_state(s, lengths, s0) for s, s0 in ((hs, h0), (cs, c0)))

        def grad(d_hs, d_h, d_c):  # noqa: ANN001, ANN202
            return _recurrence_gradient(d_hs, d_h, d_c, steps, lengths, hs, cs, gates, h0, c0,
                                        recurrent_kernel, bfloat16_gradient, loops)

        return (hs, h, c), grad

    return bucketed


_BUCKETED_RECURRENCE = {bf16: _bucketed_recurrence(bf16) for bf16 in (False, True)}


def _recurrence_gradient(d_hs, d_h, d_c, steps, lengths, hs, cs, gates, h0, c0,
                         recurrent_kernel, bfloat16_gradient=False, loops=None) -> tuple:
    """`_bucketed_recurrence`'s gradients `(dxw, None, None, dh0, dc0, dU, db)`.

    `loops`: whose backward loop (default the XLA one: `_compiled`)."""
    loops = loops or _compiled(h0.shape[-1])
    dz, dh0, dc0, d_bias = loops.backward(
        d_hs, d_h, d_c, steps, lengths, cs, gates, c0, recurrent_kernel)
    dz, d_kernel = _recurrent_kernel_gradient(tf.concat([h0[None], hs[:-1]], 0), dz,
                                              bfloat16_gradient)
    return dz, None, None, dh0, dc0, d_kernel, d_bias


def _recurrent_kernel_gradient(h_prev: tf.Tensor, dz: tf.Tensor,
                               bfloat16_gradient: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """`(dz, Σ_t h_{t-1}ᵀ·dz_t)` from h_{t-1} and dz_t at every step (any one layout),
    the dz returned to be passed on."""
    # One matmul (outside XLA: TensorFlow's own MatMul is the faster one for it;
    # in bfloat16, oneDNN's on CPUs with bfloat16 instructions).
    m = h_prev.shape[-1]
    h_prev, dz_2d = tf.reshape(h_prev, [-1, m]), tf.reshape(dz, [-1, 4 * m])
    if bfloat16_gradient:
        h_prev, dz_2d = tf.cast(h_prev, tf.bfloat16), tf.cast(dz_2d, tf.bfloat16)
    d_kernel = tf.cast(tf.matmul(h_prev, dz_2d, transpose_a=True), dz.dtype)
    # Hand dz on (to the gradients of x and W) only after that matmul: run at
    # the same time, the matmuls compete for the same cores.
    with tf.control_dependencies([d_kernel]):
        return tf.identity(dz), d_kernel


def _batch_major_recurrence(loops: _Kernel, bfloat16_gradient: bool) -> Any:
    """`recurrence` on the CPU kernel, batch-major: `(H [B, T, M], h, C)` from
    `xw` `[B, T, 4M]` (of any length: the kernel compiles nothing per shape)."""
    @tf.custom_gradient
    def batch_major(xw, lengths, h0, c0, recurrent_kernel, bias):  # noqa: ANN001, ANN202
        steps = tf.shape(xw)[1]
        hs, cs, gates = loops.forward(*_unwatched(xw, steps, h0, c0, recurrent_kernel, bias),
                                      batch_major=True)
        h, c = (_final_batch_major(s, lengths, s0) for s, s0 in ((hs, h0), (cs, c0)))

        def grad(d_hs, d_h, d_c):  # noqa: ANN001, ANN202
            dz, dh0, dc0, d_bias = loops.backward(d_hs, d_h, d_c, steps, lengths, cs, gates,
                                                  c0, recurrent_kernel, batch_major=True)
            dz, d_kernel = _recurrent_kernel_gradient(
                tf.concat([h0[:, None], hs], 1)[:, :steps], dz, bfloat16_gradient)
            return dz, None, dh0, dc0, d_kernel, d_bias

        return (hs, h, c), grad

    return batch_major


def _first_steps(hs: tf.Tensor, steps: tf.Tensor) -> tf.Tensor:
    """`hs[:steps]` as `tf.slice`, whose gradient (a pad) is the faster kernel here."""
    return tf.slice(hs, [0, 0, 0], tf.stack([steps, -1, -1]))


def final_state(states: tf.Tensor, lengths: tf.Tensor, initial: tf.Tensor) -> tf.Tensor:
    """`[B, M]`: `states` `[T, B, M]` after each sequence's last real step (`initial` for none)."""
    # (Indexed in place: a transpose to batch-major would copy every step.)
    where = tf.stack([tf.maximum(lengths - 1, 0), tf.range(tf.shape(lengths)[0])], 1)
    return tf.where((lengths > 0)[:, None], tf.gather_nd(states, where), initial)


def _final_batch_major(states: tf.Tensor, lengths: tf.Tensor, initial: tf.Tensor) -> tf.Tensor:
    """`final_state` of batch-major `states` `[B, T, M]`."""
    last = tf.gather(states, tf.maximum(lengths - 1, 0), axis=1, batch_dims=1)
    return tf.where((lengths > 0)[:, None], last, initial)


def inference(x: tf.Tensor, kernel: tf.Tensor, lengths: tf.Tensor, h0: tf.Tensor,
              c0: tf.Tensor, recurrent_kernel: tf.Tensor, bias: tf.Tensor,
              final_cell: bool = True) -> tuple:
    """All hidden states of one LSTM, and its final cell state, for inference.

    x·W for all steps is one 2-D matmul (TensorFlow's, the faster one), then one
    compiled loop runs the steps and keeps nothing; the time axis is padded to a
    multiple of `TIME_BUCKET` steps (the loop stops at the real length), so that
    sequences of any length share a few compilations. A gradient, if asked for,
    goes through the training path.

    Args:
        x: `[B, T, D]` inputs in the order they are read.
        kernel, recurrent_kernel, bias: the weights.
        lengths: `[B]` int32, the real steps of each (right-padded) sequence.
        h0, c0: `[B, M]` initial states.
        final_cell: also take C after each sequence's last real step (else C_0).

    Returns:
        `(H, h, C)`: H `[B, T, M]` h_t after every step, h and C `[B, M]` the
        state after each sequence's last real step (C_0 without `final_cell`).
    """
    steps = tf.shape(x)[1]
    xw = _projected(tf.pad(x, [[0, 0], [0, _bucketed(steps) - steps], [0, 0]]), kernel)
    hs, c = _INFERENCE[final_cell](xw, lengths, h0, c0, recurrent_kernel, bias, steps)
    return hs[:, :steps], _final_batch_major(hs, lengths, h0), c


TIME_BUCKET = 32  # the loops compile once per batch size and 32 steps of length


def _bucketed(steps: tf.Tensor) -> tf.Tensor:
    """`steps` rounded up to a positive multiple of `TIME_BUCKET`."""
    return tf.maximum((steps + TIME_BUCKET - 1) // TIME_BUCKET, 1) * TIME_BUCKET


def _differentiable_inference(final_cell: bool) -> Any:
    """The compiled inference, with a gradient (rarely wanted) through the training path.

    (Every tensor is an argument, none captured, so that a SavedModel keeps the
    gradient: loading one warns about custom gradients it could not save.)
    """
    @tf.custom_gradient
    def infer(xw, lengths, h0, c0, recurrent_kernel, bias, steps):  # noqa: ANN001, ANN202
        compiled = _compiled(h0.shape[-1])
        forward = compiled.infer_final_cell if final_cell else compiled.infer
        hs, c = forward(*_unwatched(xw, lengths, h0, c0, recurrent_kernel, bias), steps)

        def grad(d_hs, d_c):  # noqa: ANN001, ANN202
            # The training path's forward loop, kept gates and backward loop (called
            # directly: a SavedModel cannot keep a custom gradient nested in this one).
            d_hs = tf.zeros_like(hs) if d_hs is None else d_hs
            d_c = tf.zeros_like(c) if d_c is None else d_c
            # Without `final_cell`, `c` is C_0 itself: its gradient goes straight to c0.
            d_final, d_c0 = (d_c, 0.0) if final_cell else (tf.zeros_like(d_c), d_c)
            xw_t = tf.transpose(xw, [1, 0, 2])  # (padded to a bucket already)
            hs_t, cs, gates = compiled.forward(xw_t, tf.shape(xw_t)[0], h0, c0,
                                               recurrent_kernel, bias)
            dz, _, _, dh0, dc0, d_recurrent, d_bias = _recurrence_gradient(
                tf.transpose(d_hs, [1, 0, 2]), tf.zeros_like(h0), d_final, tf.shape(xw_t)[0],
                lengths, hs_t, cs, gates, h0, c0, recurrent_kernel)
            return (tf.transpose(dz, [1, 0, 2]), None, dh0, dc0 + d_c0, d_recurrent, d_bias,
                    None)

        return (hs, c), grad

    return infer


_INFERENCE = {final_cell: _differentiable_inference(final_cell) for final_cell in (False, True)}


def _infer(xw: tf.Tensor, lengths: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor,
           recurrent_kernel: tf.Tensor, bias: tf.Tensor, steps: tf.Tensor,
           final_cell: bool) -> tuple:
    """`inference`'s compiled loop: `(H [B, T, M], C [B, M])` from `xw` `[B, T, 4M]`,
    run `steps` times."""
    def body(t, h, c, c_last):
        h, c, _ = _step(xw[:, t], h, c, recurrent_kernel, bias)
        if final_cell:
            c_last = tf.where((t < lengths)[:, None], c, c_last)
        return (h, c, c_last), (h,)

    (_, _, c_last), (hs,) = _loop(steps, body, [h0, c0, c0], [(h0, h0.shape[-1])],
                                  size=tf.shape(xw)[1])
    return tf.transpose(hs, [1, 0, 2]), c_last


def pooled_inference(xw: tf.Tensor, lengths: tf.Tensor,
                     recurrent_kernel: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Σ h_t and max h_t over the real steps of one LSTM, at inference, no outputs kept.

    For a classifier that pools an LSTM's outputs over time (mean and max): one
    XLA-compiled loop that accumulates both as it goes, so that nothing is
    written per step, and that starts from a precomputed x_t·W + b (e.g. an
    embedding table folded into the input projection: a lookup per token).
    Sequences are right-padded (real steps first), so the steps past a
    sequence's length, which the loop runs too, come after all of its real
    ones and change nothing; the initial state is zeros. (Mean and max do not
    depend on the order of the steps: for a backward LSTM, pass each sequence
    reversed up to its length, `tf.reverse_sequence`.) As for `inference`, the
    time axis is padded to a multiple of `TIME_BUCKET` steps, so that any
    length reuses a few compilations (nothing is copied if it is one already).

    Args:
        xw: `[T, B, 4M]` x_t·W + b for every step in the order read
            (time-major; gate order i, f, c, o).
        lengths: `[B]` int32, the real steps of each sequence.
        recurrent_kernel: `[M, 4M]`.

    Returns:
        `(total, peak)`, `[B, M]` each: Σ h_t over the real steps (0 for none)
        and max h_t over them (-inf for none).
    """
    steps = tf.shape(xw)[0]
    xw = tf.pad(xw, [[0, _bucketed(steps) - steps], [0, 0], [0, 0]])
    return _compiled(recurrent_kernel.shape[0]).pool(
        *_unwatched(xw, tf.cast(lengths, tf.int32), recurrent_kernel))


def _pool(xw: tf.Tensor, lengths: tf.Tensor, recurrent_kernel: tf.Tensor) -> tuple:
    """`pooled_inference`'s compiled body."""
    zeros = tf.zeros([tf.shape(xw)[1], recurrent_kernel.shape[0]], xw.dtype)
    no_bias = tf.zeros(recurrent_kernel.shape[1:], xw.dtype)  # (it is in xw)

    def body(t, h, c, total, peak):
        h, c, _ = _step(xw[t], h, c, recurrent_kernel, no_bias)
        real = (t < lengths)[:, None]
        return (h, c, total + tf.where(real, h, 0.0),
                tf.maximum(peak, tf.where(real, h, float("-inf")))), ()

    steps = tf.minimum(tf.reduce_max(lengths), tf.shape(xw)[0])
    (_, _, total, peak), _ = _loop(steps, body, [zeros, zeros, zeros, zeros - float("inf")], [])
    return total, peak


class _Compiled:
    """The loops compiled by XLA, for one number of units.

    (One set per layer size, so that each is traced once per batch/sequence
    shape rather than once per layer size and shape.)
    """

    def __init__(self) -> None:
        jit = functools.partial(tf.function, jit_compile=True, reduce_retracing=True)
        self.forward = jit(_forward)
        self.infer = jit(functools.partial(_infer, final_cell=False))
        self.infer_final_cell = jit(functools.partial(_infer, final_cell=True))
        self.backward = jit(_backward)
        self.pool = jit(_pool)


@functools.cache
def _compiled(units: int) -> _Compiled:
    return _Compiled()


class _Kernel:
    """The training loops as the CPU kernel's ops (`cpu_kernel.py`): `_Compiled`'s
    `forward` and `backward`, same arguments and results (with `batch_major`, every
    `[T, B, ·]` array is `[B, T, ·]` instead)."""

    def __init__(self, ops: Any, threads: int) -> None:
        """`threads`: how many threads share each step (0: all of TensorFlow's)."""
        self._ops, self._threads = ops, threads

    def forward(self, xw: tf.Tensor, steps: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor,
                recurrent_kernel: tf.Tensor, bias: tf.Tensor, batch_major: bool = False) -> tuple:
        return tuple(self._ops.lstm_tf_forward(xw, steps, h0, c0, recurrent_kernel, bias,
                                               threads=self._threads, batch_major=batch_major))

    def backward(self, d_hs: tf.Tensor, d_h: tf.Tensor, d_c: tf.Tensor, steps: tf.Tensor,
                 lengths: tf.Tensor, cs: tf.Tensor, gates: tf.Tensor, c0: tf.Tensor,
                 recurrent_kernel: tf.Tensor, batch_major: bool = False) -> tuple:
        dz, dh0, dc0, d_bias = self._ops.lstm_tf_backward(
            d_hs, d_h, d_c, steps, lengths, cs, gates, c0, recurrent_kernel,
            threads=self._threads, batch_major=batch_major)
        empty = (lengths == 0)[:, None]  # the final state is the initial one
        return dz, dh0 + tf.where(empty, d_h, 0), dc0 + tf.where(empty, d_c, 0), d_bias


@contextlib.contextmanager
def side_by_side() -> Iterator[None]:
    """Within it, the training recurrences traced run concurrently with another (a
    `Bidirectional`'s two directions): on a CPU, each keeps to one thread."""
    token = _side_by_side.set(True)
    try:
        yield
    finally:
        _side_by_side.reset(token)


def _training_loops(h0: tf.Tensor) -> _Compiled | _Kernel:
    """The training path's loops for float32 state on a CPU: the CPU kernel's where it
    loads (`cpu_kernel.py`), else (and for other dtypes, or with a GPU) XLA's."""
    units = h0.shape[-1]
    ops = cpu_kernel.ops() if h0.dtype == tf.float32 and not _has_gpu() else None
    if ops is None:
        return _compiled(units)
    # One thread where a step's matmul is too small to share (below 128 units) or
    # where another recurrence runs beside this one: then the step has no
    # synchronization at all, and the two run on two cores side by side.
    alone = units < 128 or _side_by_side.get()
    return _Kernel(ops, threads=1 if alone else 0)


@functools.cache
def _has_gpu() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


def _unwatched(*tensors: tf.Tensor) -> list[tf.Tensor]:
    return [tf.stop_gradient(t) for t in tensors]


def _step(x_w: tf.Tensor, h: tf.Tensor, c: tf.Tensor, recurrent_kernel: tf.Tensor,
          bias: tf.Tensor) -> tuple:
    """One `LSTMCell` step from the precomputed x_t·W: (h_t, C_t, [i, f, C̃, o])."""
    m = h.shape[-1]
    z = x_w + tf.matmul(h, recurrent_kernel) + bias
    # One sigmoid over all four gates (one fused pass): tanh(z) = 2σ(2z) - 1
    # for the candidate C̃ (one pass instead of separate sigmoid and tanh calls
    # on the slices of z).
    scale = tf.repeat(tf.constant([1, 1, 2, 1], z.dtype), m)
    gates = tf.sigmoid(z * scale) * scale - (scale - 1)
    i, f, candidate, o = (gates[:, j * m:(j + 1) * m] for j in range(4))
    c = f * c + i * candidate
    return o * tf.tanh(c), c, gates


def _loop(steps: tf.Tensor, body: Any, state: list, outputs: list[tuple[tf.Tensor, int]],
          reverse: bool = False, size: Any = None) -> tuple:
    """Runs `body(t, *state) -> (state, per_step_outputs)` for t < steps.

    `reverse`: from the last step to the first. `size`: the length of the
    outputs (default `steps`; past `steps` they are zeros).

    Returns the final state and the per-step outputs stacked in step order,
    `[T, B, width]` for each `(example, width)` in `outputs`.
    """
    arrays = [tf.TensorArray(like.dtype, size=steps if size is None else size,
                             element_shape=[like.shape[0], width])
              for like, width in outputs]

    # The step t is carried, not computed from `steps` in the body: a `steps` the body
    # reads would have to be a compile-time constant (XLA would compile once per length).
    def loop_body(k, t, *carried):
        state, values = body(t, *carried[:len(carried) - len(arrays)])
        written = [a.write(t, v) for a, v in zip(carried[len(state):], values, strict=True)]
        return (k + 1, t - 1 if reverse else t + 1, *state, *written)

    first = steps - 1 if reverse else 0
    _, _, *carried = tf.while_loop(lambda k, *_: k < steps, loop_body,
                                   [0, first, *state, *arrays], maximum_iterations=steps)
    return carried[:len(state)], [a.stack() for a in carried[len(state):]]


def _forward(xw: tf.Tensor, steps: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor,
             recurrent_kernel: tf.Tensor, bias: tf.Tensor) -> tuple:
    """`(H, Cs, G)` `[T, B, ·]`: h_t, C_t and the gates i, f, C̃, o of the first `steps` steps.

    (Nothing but the step itself in the loop: the final states are gathered
    afterwards, `final_state`.)
    """
    def body(t, h, c):
        h, c, gates = _step(xw[t], h, c, recurrent_kernel, bias)
        return (h, c), (h, c, gates)

    m = h0.shape[-1]
    _, kept = _loop(steps, body, [h0, c0], [(h0, m), (c0, m), (h0, 4 * m)],
                    size=tf.shape(xw)[0])
    return tuple(kept)


def _backward(d_hs: tf.Tensor, d_h: tf.Tensor, d_c: tf.Tensor, steps: tf.Tensor,
              lengths: tf.Tensor, cs: tf.Tensor, gates: tf.Tensor, c0: tf.Tensor,
              recurrent_kernel: tf.Tensor) -> tuple:
    """`(dz, dh0, dc0, d_bias)`; dz `[T, B, 4M]`: the gradient of z_t = x_t·W + h_{t-1}·U + b.

    Only two products depend on the step before: dh_{t-1} = dz_t·Uᵀ (+ the
    outputs' own gradient) and dC_{t-1} = dC_t ⊙ f_t. Each step's other factors
    of the chain rule come from its kept gates and C_t inside the same
    element-wise pass (computed for all steps before the loop, they would be
    `[T, B, 4M]` more to write and read back).
    """
    kernel_t = tf.transpose(recurrent_kernel)
    m = c0.shape[-1]
    # Each gate's derivative from its activation g, as a + b·g - g² per column:
    # σ' = g - g² (i, f, o), tanh' = 1 - g² (C̃); one pass over all four gates.
    a = tf.repeat(tf.constant([0, 0, 1, 0], c0.dtype), m)
    b = tf.repeat(tf.constant([1, 1, 0, 1], c0.dtype), m)

    def body(t, dh_next, dc_next):
        g = gates[t]
        i, f, candidate, o = tf.split(g, 4, axis=1)
        c_prev = tf.where(t > 0, cs[tf.maximum(t - 1, 0)], c0)
        tanh_c = tf.tanh(cs[t])
        # The final state's gradient enters at each sequence's last real step.
        last = (t == lengths - 1)[:, None]
        dh = d_hs[t] + dh_next + tf.where(last, d_h, 0.0)
        dc = dc_next + tf.where(last, d_c, 0.0) + dh * o * (1 - tanh_c * tanh_c)
        # dz_t through i_t, f_t, C̃_t and o_t
        dz = tf.concat([dc * candidate, dc * c_prev, dc * i, dh * tanh_c], 1) * (a + b * g - g * g)
        return (tf.matmul(dz, kernel_t), dc * f), (dz,)

    (dh0, dc0), (dz,) = _loop(steps, body, [tf.zeros_like(c0), tf.zeros_like(c0)],
                              [(c0, 4 * m)], reverse=True, size=tf.shape(cs)[0])
    empty = (lengths == 0)[:, None]  # the final state is the initial one
    return (dz, dh0 + tf.where(empty, d_h, 0), dc0 + tf.where(empty, d_c, 0),
            tf.reduce_sum(dz, [0, 1]))


def run(x: tf.Tensor, kernel: Any, recurrent_kernel: Any, bias: Any, go_backwards: bool,
        initial_state: list[Any], mask: tf.Tensor | None,
        zero_output_for_mask: bool, training: bool = True, final_cell: bool = True) -> tuple:
    """One LSTM over `x` with `keras.layers.RNN`'s semantics, on the fused path.

    Masks become per-sequence lengths: the loops run over each sequence's real
    steps moved to the front (nothing moves for a right-padded mask, the usual
    case: a `tf.cond` picks that path), and the outputs are put back in the
    order the steps were read, masked steps repeating the last output (or 0).

    Args:
        x: `[B, T, D]` inputs (after dropout).
        kernel, recurrent_kernel, bias: the cell's weights (bias may be None).
        go_backwards: whether to read the sequence backwards.
        initial_state: `[h0, c0]`.
        mask: `[B, T]` boolean, True at real steps, or None.
        zero_output_for_mask: outputs at masked steps are 0 (else the last output).
        training: keep what the gradient needs (`recurrence`); else `inference`.
        final_cell: at inference, whether the final C is needed (else C_0 is returned).

    Returns:
        `(last_output, outputs, [h, c])` as `keras.layers.RNN.inner_loop` returns
        them (outputs in the order the steps were read).
    """
    # Mixed precision (x in float16 or bfloat16): the recurrence runs in float32,
    # h and C included (rounded to 16 bits at every step, C drifts over long
    # sequences, and XLA's loops are no faster in 16 bits on a CPU); only training's
    # matmuls outside the loops stay in bfloat16 (the input projection, its
    # gradients, the recurrent kernel's gradient), fast oneDNN matmuls on CPUs
    # with bf16 instructions (under mixed_float16 they run in float32: TensorFlow's
    # float16 matmul is slower there). The outputs and states come back in x's
    # dtype, as the step path gives them.
    dtype = x.dtype
    exact = tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype
    projection = tf.bfloat16 if training and dtype == tf.bfloat16 else exact
    x, kernel = tf.cast(x, projection), tf.cast(kernel, projection)
    h0, c0 = (tf.cast(s, exact) for s in initial_state)
    recurrent_kernel = tf.cast(recurrent_kernel, exact)
    bias = tf.zeros(kernel.shape[-1:], exact) if bias is None else tf.cast(bias, exact)
    shape = x.shape[:2].concatenate(recurrent_kernel.shape[:1])  # [B, T, U], as far as known
    masked = mask is not None
    if masked:
        mask = tf.cast(mask, tf.bool)
        lengths, right_padded = right_padded_lengths(mask)
        x = tf.cond(right_padded, lambda: x,
                    lambda: tf.gather(x, _real_steps_first(mask), axis=1, batch_dims=1))
    else:
        lengths = tf.fill(tf.shape(h0)[:1], x.shape[1] or tf.shape(x)[1])
    if go_backwards:
        x = reverse_real_steps(x, lengths) if masked else tf.reverse(x, [1])
    if training:
        h_seq, h_last, c_last = _training(x, kernel, lengths, h0, c0, recurrent_kernel, bias)
    else:
        h_seq, h_last, c_last = inference(x, kernel, lengths, h0, c0, recurrent_kernel,
                                          bias, final_cell)
    h_seq, h_last, c_last = (tf.cast(t, dtype) for t in (h_seq, h_last, c_last))
    # (The compiled loops are traced for any shape: the static shapes are the call's.)
    h_seq = with_shape(h_seq, shape)
    h_last, c_last = (with_shape(t, shape[::2]) for t in (h_last, c_last))
    if not masked:
        return (*_with_last(h_seq, h_last), [h_last, c_last])
    last_output, outputs = tf.cond(
        right_padded,
        lambda: keras_outputs(h_seq, h_last, lengths, go_backwards, zero_output_for_mask),
        lambda: _with_last(_outputs_in_read_order(h_seq, mask, go_backwards,
                                                  zero_output_for_mask), h_last))
    return last_output, with_shape(outputs, shape), [h_last, c_last]


def _real_steps_first(mask: tf.Tensor) -> tf.Tensor:
    """`[B, T]` the time indices of each sequence's real steps, then of its masked ones."""
    count = tf.cumsum(tf.cast(mask, tf.int32), axis=1)  # real steps up to t
    t = tf.range(tf.shape(mask)[1])[None]
    # Where step t goes: the count-th real step, or after all real ones.
    position = tf.where(mask, count - 1, count[:, -1:] + t - count)
    return tf.argsort(position, axis=1, stable=True)


def _outputs_in_read_order(h_seq: tf.Tensor, mask: tf.Tensor, go_backwards: bool,
                           zero_output_for_mask: bool) -> tf.Tensor:
    """`[B, T, U]` outputs as read, from `h_seq` h after each sequence's k-th real step read."""
    read = tf.reverse(mask, [1]) if go_backwards else mask
    latest = tf.cumsum(tf.cast(read, tf.int32), axis=1) - 1  # the last real step read so far
    outputs = tf.gather(h_seq, tf.maximum(latest, 0), axis=1, batch_dims=1)
    # Masked steps repeat the last output (Keras: zeros before any real step).
    keep = read if zero_output_for_mask else latest >= 0
    return tf.where(keep[:, :, None], outputs, tf.zeros_like(outputs))


def _training(x: tf.Tensor, kernel: tf.Tensor, lengths: tf.Tensor, h0: tf.Tensor,
              c0: tf.Tensor, recurrent_kernel: tf.Tensor, bias: tf.Tensor) -> tuple:
    """`recurrence` from batch-major inputs: `(H [B, T, M], h, C)`."""
    bfloat16_gradient = kernel.dtype == tf.bfloat16
    loops = _training_loops(h0)
    if isinstance(loops, _Kernel):
        # The kernel reads and writes the layers' batch-major arrays, of any
        # length: no transposes, no padding.
        xw = tf.cast(_projected(x, kernel), recurrent_kernel.dtype)
        return _batch_major_recurrence(loops, bfloat16_gradient)(
            xw, lengths, h0, c0, recurrent_kernel, bias)
    steps = tf.shape(x)[1]
    # Time-major and padded to a bucket of lengths (zero steps too: tf.distribute
    # feeds `(0, 0, features)` batches to replicas without data in a step, and XLA
    # cannot compile an empty loop's arrays), then x_t·W for all steps as one 2-D
    # matmul (its gradients too; faster than `einsum`).
    x = tf.pad(tf.transpose(x, [1, 0, 2]), [[0, _bucketed(steps) - steps], [0, 0], [0, 0]])
    xw = tf.cast(_projected(x, kernel), recurrent_kernel.dtype)  # (mixed precision: see `run`)
    # (The recurrent kernel's gradient in the projection's dtype: bfloat16 under mixed_bfloat16.)
    hs, h_last, c_last = _BUCKETED_RECURRENCE[bfloat16_gradient](
        xw, steps, lengths, h0, c0, recurrent_kernel, bias)
    return tf.transpose(_first_steps(hs, steps), [1, 0, 2]), h_last, c_last


def _projected(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """`[T1, T2, 4M]` x·W of `x` `[T1, T2, D]` as one 2-D matmul (faster than `einsum`)."""
    return tf.reshape(tf.matmul(tf.reshape(x, [-1, tf.shape(x)[-1]]), kernel),
                      tf.concat([tf.shape(x)[:2], tf.shape(kernel)[-1:]], 0))


def keras_outputs(h_seq: tf.Tensor, h_last: tf.Tensor, lengths: tf.Tensor | None,
                  go_backwards: bool, zero_output_for_mask: bool) -> tuple:
    """`(last_output, outputs)` as `keras.layers.RNN` gives them, from an unmasked run.

    Args:
        h_seq: `[B, T, U]` h after every step of the sequences as read (reversed
            up to each length if `go_backwards`), real steps first.
        h_last: `[B, U]` the state after each sequence's last real step.
        lengths: `[B]` real lengths of right-padded sequences, or None.
        go_backwards, zero_output_for_mask: the layer's.
    """
    if lengths is None:
        outputs = h_seq
    else:
        valid = tf.sequence_mask(lengths, tf.shape(h_seq)[1])[:, :, None]
        if go_backwards:
            # Read order: the padding first (output 0), then the real steps reversed.
            outputs = tf.reverse(reverse_real_steps(
                tf.where(valid, h_seq, tf.zeros_like(h_seq)), lengths), [1])
        else:
            # Masked steps repeat the last output (Keras: zeros before any real step).
            held = tf.zeros_like(h_seq)
            if not zero_output_for_mask:
                held = tf.where(lengths[:, None, None] > 0, h_last[:, None], held)
            outputs = tf.where(valid, h_seq, held)
    return _with_last(outputs, h_last)


def _with_last(outputs: tf.Tensor, h_last: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(last_output, outputs)`: the output of the last step read, and all of them."""
    if outputs.shape[1]:
        return outputs[:, -1], outputs
    # Possibly no steps: then the last output is the (initial) state.
    return tf.concat([h_last[:, None], outputs], 1)[:, -1], outputs


@tf.custom_gradient
def reverse_real_steps(x: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
    """`[B, T, ...]` with each sequence's first `lengths` steps reversed, the rest in place.

    `tf.reverse_sequence` as a gather, the faster kernel here; the gradient is the
    same permutation (its own inverse) of the output's gradient. (The gradient
    uses the inputs only, so that a SavedModel can keep it.)
    """
    def grad(dy: tf.Tensor) -> tuple:
        return tf.gather(dy, _reversal(lengths, tf.shape(dy)[1]), axis=1, batch_dims=1), None

    return tf.gather(x, _reversal(lengths, tf.shape(x)[1]), axis=1, batch_dims=1), grad


def _reversal(lengths: tf.Tensor, steps: tf.Tensor) -> tf.Tensor:
    """`[B, T]` step indices: the first `lengths` reversed, the rest in place."""
    t = tf.range(steps)[None]
    lengths = tf.cast(lengths, tf.int32)[:, None]
    return tf.where(t < lengths, lengths - 1 - t, t)


def right_padded_lengths(mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`[B]` lengths of a `[B, T]` mask, and whether it is right-padded (a bool scalar)."""
    mask = tf.cast(mask, tf.bool)
    lengths = tf.reduce_sum(tf.cast(mask, tf.int32), 1)
    right_padded = tf.reduce_all(tf.equal(mask, tf.sequence_mask(lengths, tf.shape(mask)[1])))
    return lengths, right_padded


def with_shape(tensor: tf.Tensor, shape: tf.TensorShape) -> tf.Tensor:
    """`tensor` with its static shape refined to `shape` (no op in the graph)."""
    tensor.set_shape(shape)
    return tensor
