"""The fused LSTM sequence path: the same maths as `LSTMCell`, fewer ops per step.

What it does to be fast on a CPU (the speed it reaches, 1.0-1.5x `keras.layers.LSTM` for
training from 256 units, is in the README; `benchmarks/lstm_throughput.py` measures it):

* The input projection x_t·W + b of every step is one large matmul before the
  loop; only h_{t-1}·U stays inside it.
* A hand-written gradient (`tf.custom_gradient`) for the whole recurrence: the
  forward loop keeps the activations it computed anyway; the backward loop is
  a few fused element-wise ops (`SigmoidGrad`, `TanhGrad`) and dz_t·Uᵀ on
  cache-sized tensors (whole-sequence element-wise passes measured slower:
  they are memory-bound); the weight gradient Σ_t h_{t-1}ᵀ·dz_t is one matmul
  after the loop.
* Masks become per-sequence lengths: the loop runs unmasked and the final
  state is gathered at each sequence's last real step; the backward direction
  reads each sequence reversed up to its length (`tf.reverse_sequence`).
* A `Bidirectional`'s two directions are two independent loops in one graph,
  which TensorFlow runs concurrently, one per core. (Running both in one loop
  as an LSTM of 2·units with a block-diagonal recurrent kernel measured
  1.4-1.7x slower than that here: twice the matmul FLOPs, one core.)
* Only cheap ops in the loops: 2-D `MatMul` (not `BatchMatMul`, and no
  `transpose_b`, which is ~2x slower there), strided slices instead of
  `Split`, no broadcasting.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


@tf.custom_gradient
def recurrence(xz: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor,
               recurrent_kernel: tf.Tensor) -> tuple[Any, Any]:
    """All hidden and cell states of one LSTM of M units.

    Args:
        xz: `[T, B, 4M]`, x_t·W + b for every step (gate order i, f, c, o).
        h0, c0: `[B, M]` initial states.
        recurrent_kernel: `[M, 4M]`.

    Returns:
        `(H, C)`, each `[T, B, M]`: h_t and C_t after every step.
    """
    steps, m = tf.shape(xz)[0], h0.shape[-1]

    def forward_body(t, h, c, *arrays):
        z = xz[t] + tf.matmul(h, recurrent_kernel)
        s = tf.sigmoid(z)  # i, f, (unused), o
        g = tf.tanh(z[:, 2 * m:3 * m])
        c = s[:, m:2 * m] * c + s[:, :m] * g
        tanh_c = tf.tanh(c)
        h = s[:, 3 * m:] * tanh_c
        return (t + 1, h, c, *(a.write(t, v) for a, v in zip(arrays, (h, c, s, g, tanh_c),
                                                              strict=True)))

    arrays = [tf.TensorArray(xz.dtype, size=steps) for _ in range(5)]
    _, _, _, *arrays = tf.while_loop(lambda t, *_: t < steps, forward_body, [0, h0, c0, *arrays])
    # (The gradient must capture plain tensors, not TensorArrays, so that
    # `model.export` can save a model that holds this function.)
    hs, cs, sigmoids, candidates, tanh_cs = (
        _stack(a, h0, width) for a, width in zip(arrays, (m, m, 4 * m, m, m), strict=True))

    def grad(d_hs: tf.Tensor, d_cs: tf.Tensor) -> tuple[Any, ...]:
        c_prevs = tf.concat([c0[None], cs[:-1]], 0)
        kernel_t = tf.transpose(recurrent_kernel)
        sigmoid_grad, tanh_grad = tf.raw_ops.SigmoidGrad, tf.raw_ops.TanhGrad

        def backward_body(k, dh_rec, dc_rec, dzs):
            t = steps - 1 - k
            s, g, tanh_c = sigmoids[t], candidates[t], tanh_cs[t]
            i, f, o = s[:, :m], s[:, m:2 * m], s[:, 3 * m:]
            dh = d_hs[t] + dh_rec
            dc = d_cs[t] + dc_rec + tanh_grad(y=tanh_c, dy=dh * o)
            dz = tf.concat([sigmoid_grad(y=i, dy=dc * g),  # through i_t
                            sigmoid_grad(y=f, dy=dc * c_prevs[t]),  # through f_t
                            tanh_grad(y=g, dy=dc * i),  # through C̃_t
                            sigmoid_grad(y=o, dy=dh * tanh_c)], -1)  # through o_t
            return k + 1, tf.matmul(dz, kernel_t), dc * f, dzs.write(t, dz)

        _, dh0, dc0, dzs = tf.while_loop(
            lambda k, *_: k < steps, backward_body,
            [0, tf.zeros_like(h0), tf.zeros_like(c0), tf.TensorArray(xz.dtype, size=steps)])
        dz = _stack(dzs, h0, 4 * m)
        # Σ_t h_{t-1}ᵀ·dz_t as one matmul.
        h_prev = tf.reshape(tf.concat([h0[None], hs[:-1]], 0), [-1, m])
        d_kernel = tf.matmul(h_prev, tf.reshape(dz, [-1, 4 * m]), transpose_a=True)
        return dz, dh0, dc0, d_kernel

    return (hs, cs), grad


def _stack(array: tf.TensorArray, h0: tf.Tensor, width: int) -> tf.Tensor:
    """`array.stack()` of `[B, width]` elements, also for zero steps.

    (TF cannot stack an empty list of `[None, width]`; tf.distribute feeds
    zero-step batches to replicas that have no data in a step.)
    """
    return tf.cond(array.size() > 0, array.stack,
                   lambda: tf.zeros([0, tf.shape(h0)[0], width], h0.dtype))


def run(x: tf.Tensor, kernel: Any, recurrent_kernel: Any, bias: Any, go_backwards: bool,
        initial_state: list[Any], lengths: tf.Tensor | None,
        zero_output_for_mask: bool) -> tuple:
    """One LSTM over `x` with `keras.layers.RNN`'s semantics, on the fused path.

    Args:
        x: `[B, T, D]` inputs (after dropout).
        kernel, recurrent_kernel, bias: the cell's weights (bias may be None).
        go_backwards: whether to read the sequence backwards.
        initial_state: `[h0, c0]`.
        lengths: `[B]` real lengths of right-padded sequences, or None.
        zero_output_for_mask: outputs at masked steps are 0 (else the last output).

    Returns:
        `(last_output, outputs, [h, c])` as `keras.layers.RNN.inner_loop` returns
        them (outputs in the order the steps were read).
    """
    h0, c0 = (tf.convert_to_tensor(s) for s in initial_state)
    if go_backwards:
        x = tf.reverse(x, [1]) if lengths is None else tf.reverse_sequence(x, lengths, 1, 0)
    xz = tf.einsum("btd,dk->tbk", x, tf.convert_to_tensor(kernel))
    if bias is not None:
        xz = xz + tf.convert_to_tensor(bias)
    hs, cs = recurrence(xz, h0, c0, tf.convert_to_tensor(recurrent_kernel))
    h_seq = tf.transpose(hs, [1, 0, 2])  # [B, T, U]
    if lengths is None:
        h_last, c_last = tf.cond(tf.shape(hs)[0] > 0, lambda: (hs[-1], cs[-1]),
                                 lambda: (h0, c0))  # zero steps: the initial state
        outputs = h_seq
    else:
        h_last, c_last = _at_lengths(hs, h0, lengths), _at_lengths(cs, c0, lengths)
        valid = tf.sequence_mask(lengths, tf.shape(h_seq)[1])[:, :, None]
        if go_backwards:
            # Read order: the padding first (output 0), then the real steps reversed.
            outputs = tf.reverse(tf.reverse_sequence(
                tf.where(valid, h_seq, tf.zeros_like(h_seq)), lengths, 1, 0), [1])
        else:
            # Masked steps repeat the last output (Keras: zeros before any real step).
            held = tf.zeros_like(h_seq)
            if not zero_output_for_mask:
                held = tf.where(lengths[:, None, None] > 0, h_last[:, None], held)
            outputs = tf.where(valid, h_seq, held)
    last_output = tf.cond(tf.shape(outputs)[1] > 0, lambda: outputs[:, -1], lambda: h_last)
    return last_output, outputs, [h_last, c_last]


def _at_lengths(states: tf.Tensor, initial: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
    """`states` `[T, B, U]`, after step `lengths[b]` for each b (`initial` if 0)."""
    with_initial = tf.concat([initial[None], states], 0)
    index = tf.stack([tf.cast(lengths, tf.int32), tf.range(tf.shape(states)[1])], 1)
    return tf.gather_nd(with_initial, index)


def right_padded_lengths(mask: tf.Tensor) -> tf.Tensor:
    """`[B]` lengths of a `[B, T]` mask, asserting it is right-padded."""
    mask = tf.cast(mask, tf.bool)
    lengths = tf.reduce_sum(tf.cast(mask, tf.int32), 1)
    right_padded = tf.reduce_all(tf.equal(mask, tf.sequence_mask(lengths, tf.shape(mask)[1])))
    with tf.control_dependencies([tf.debugging.Assert(right_padded, [
            "lstm_tf: the fused LSTM path needs right-padded masks "
            "(True then False); pass fused=False for other masks"])]):
        return tf.identity(lengths)
