"""The fused LSTM sequence path: the same maths as `LSTMCell`, fewer ops per step.

What makes it fast on a CPU (measured in `benchmarks/lstm_throughput.py`):

* The input projection x_t·W + b of every step is one large matmul before the
  loop; only h_{t-1}·U stays inside it.
* A hand-written gradient (`tf.custom_gradient`) for the whole recurrence: the
  forward loop keeps only h_t and C_t; the backward pass recomputes every gate
  activation in bulk (one large matmul and element-wise ops over all steps at
  once), so its loop is a handful of element-wise ops and dz_t·Uᵀ; the weight
  gradient Σ_t h_{t-1}ᵀ·dz_t is one matmul after the loop.
* Masks become per-sequence lengths: the loop runs unmasked and the final
  state is gathered at each sequence's last real step; the backward direction
  reads each sequence reversed up to its length (`tf.reverse_sequence`).
* Several directions (a `Bidirectional`'s two) run in the same loop as one
  batched matmul per step, not one after the other.
* The loop is unrolled `UNROLL` steps per iteration to amortise control flow.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

UNROLL = 4


def _chunks(x: tf.Tensor, unroll: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`[T, ...]` → `[ceil(T/unroll), unroll, ...]` (zero-padded at the end), T."""
    steps = tf.shape(x)[0]
    padded = -(-steps // unroll) * unroll
    x = tf.pad(x, [[0, padded - steps]] + [[0, 0]] * (len(x.shape) - 1))
    return tf.reshape(x, tf.concat([[padded // unroll, unroll], tf.shape(x)[1:]], 0)), steps


def _gates(z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    z_i, z_f, z_c, z_o = tf.split(z, 4, axis=-1)
    return tf.sigmoid(z_i), tf.sigmoid(z_f), tf.tanh(z_c), tf.sigmoid(z_o)


@tf.custom_gradient
def recurrence(xz: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor,
               recurrent_kernel: tf.Tensor) -> tuple[Any, Any]:
    """All hidden and cell states of N independent LSTMs run side by side.

    Args:
        xz: `[T, N, B, 4U]`, x_t·W + b for every step (gate order i, f, c, o).
        h0, c0: `[N, B, U]` initial states.
        recurrent_kernel: `[N, U, 4U]`.

    Returns:
        `(H, C)`, each `[T, N, B, U]`: h_t and C_t after every step.
    """
    chunks, steps = _chunks(xz, UNROLL)

    def forward_body(k, h, c, hs, cs):
        h_out, c_out = [], []
        for z_x in tf.unstack(chunks[k], num=UNROLL):
            i, f, c_candidate, o = _gates(z_x + tf.matmul(h, recurrent_kernel))
            c = f * c + i * c_candidate
            h = o * tf.tanh(c)
            h_out.append(h)
            c_out.append(c)
        return k + 1, h, c, hs.write(k, tf.stack(h_out)), cs.write(k, tf.stack(c_out))

    n = tf.shape(chunks)[0]
    arrays = [tf.TensorArray(xz.dtype, size=n) for _ in range(2)]
    _, _, _, hs, cs = tf.while_loop(lambda k, *_: k < n, forward_body, [0, h0, c0, *arrays])
    unchunk = lambda a: tf.reshape(a.stack(), tf.concat([[-1], tf.shape(h0)], 0))[:steps]  # noqa: E731
    hs, cs = unchunk(hs), unchunk(cs)

    def grad(d_hs: tf.Tensor, d_cs: tf.Tensor) -> tuple[Any, ...]:
        h_prev = tf.concat([h0[None], hs[:-1]], 0)
        c_prev = tf.concat([c0[None], cs[:-1]], 0)
        # Every step's gates at once: xz + h_{t-1}·U as one batched matmul.
        shape = tf.shape(h_prev)
        h_rows = tf.reshape(tf.transpose(h_prev, [1, 0, 2, 3]), [shape[1], -1, shape[3]])
        z_h = tf.transpose(tf.reshape(tf.matmul(h_rows, recurrent_kernel),
                                      [shape[1], shape[0], shape[2], -1]), [1, 0, 2, 3])
        i, f, g, o = _gates(xz + z_h)
        tanh_c = tf.tanh(cs)
        # Per step: dh = dH_t + dh_rec; dC = dC_t + dC_rec + dh·o·(1 - tanh²C_t);
        # dz_o = dh·tanh(C_t)·o(1-o); (dz_i, dz_f, dz_c) = dC·(g·i(1-i), C_{t-1}·f(1-f), i(1-g²)).
        per_step = tf.concat([
            d_hs, d_cs, o * (1 - tanh_c * tanh_c), tanh_c * o * (1 - o), f,
            g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], axis=-1)
        back_chunks, _ = _chunks(tf.reverse(per_step, [0]), UNROLL)
        units = tf.shape(h0)[-1]

        def backward_body(k, dh_rec, dc_rec, dzs):
            dz_out = []
            for row in tf.unstack(back_chunks[k], num=UNROLL):
                d_h, d_c, a_c, a_o, f_t, a_ifc = tf.split(
                    row, [units, units, units, units, units, 3 * units], axis=-1)
                dh = d_h + dh_rec
                dc = d_c + dc_rec + dh * a_c
                dz = tf.concat([tf.tile(dc, [1, 1, 3]) * a_ifc, dh * a_o], -1)
                dh_rec = tf.matmul(dz, recurrent_kernel, transpose_b=True)
                dc_rec = dc * f_t
                dz_out.append(dz)
            return k + 1, dh_rec, dc_rec, dzs.write(k, tf.stack(dz_out))

        n_back = tf.shape(back_chunks)[0]
        zeros = tf.zeros_like(h0)
        # Padded steps (at the reversed end) have all-zero rows: they change nothing.
        _, dh0, dc0, dzs = tf.while_loop(
            lambda k, *_: k < n_back, backward_body,
            [0, zeros, zeros, tf.TensorArray(xz.dtype, size=n_back)])
        dz = tf.reverse(tf.reshape(dzs.stack(), tf.concat([[-1], tf.shape(xz)[1:]], 0))[:steps],
                        [0])
        # Σ_t h_{t-1}ᵀ·dz_t, one matmul per direction.
        dz_rows = tf.reshape(tf.transpose(dz, [1, 0, 2, 3]), [shape[1], -1, 4 * shape[3]])
        d_kernel = tf.matmul(h_rows, dz_rows, transpose_a=True)
        return dz, dh0, dc0, d_kernel

    return (hs, cs), grad


def run(xs: list[tf.Tensor], kernels: list[Any], recurrent_kernels: list[Any],
        biases: list[Any], go_backwards: list[bool], initial_states: list[list[Any]],
        lengths: tf.Tensor | None, zero_output_for_mask: bool) -> list[tuple]:
    """Runs N LSTMs over `xs` in one loop, with `keras.layers.RNN`'s semantics.

    Args:
        xs: N `[B, T, D]` inputs (after dropout).
        kernels, recurrent_kernels, biases: the N cells' weights (bias may be None).
        go_backwards: per LSTM, whether it reads the sequence backwards.
        initial_states: N `[h0, c0]`.
        lengths: `[B]` real lengths of right-padded sequences, or None.
        zero_output_for_mask: outputs at masked steps are 0 (else the last output).

    Returns:
        Per LSTM, `(last_output, outputs, [h, c])` as `keras.layers.RNN.inner_loop`
        returns them (outputs in the order the steps were read).
    """
    tensor = lambda w: None if w is None else tf.convert_to_tensor(w)  # noqa: E731
    kernels, recurrent_kernels, biases = ([tensor(w) for w in ws] for ws in (
        kernels, recurrent_kernels, biases))
    initial_states = [[tensor(h), tensor(c)] for h, c in initial_states]
    projections = []
    for x, kernel, bias, backwards in zip(xs, kernels, biases, go_backwards, strict=True):
        if backwards:
            x = tf.reverse(x, [1]) if lengths is None else tf.reverse_sequence(x, lengths, 1, 0)
        z = tf.einsum("btd,dk->tbk", x, kernel)
        projections.append(z if bias is None else z + bias)
    hs, cs = recurrence(tf.stack(projections, 1),
                        tf.stack([s[0] for s in initial_states]),
                        tf.stack([s[1] for s in initial_states]),
                        tf.stack(recurrent_kernels))
    results = []
    for n, backwards in enumerate(go_backwards):
        h_seq = tf.transpose(hs[:, n], [1, 0, 2])  # [B, T, U]
        if lengths is None:
            h_last, c_last = hs[-1, n], cs[-1, n]
            outputs = h_seq
        else:
            h_last = _at_lengths(hs[:, n], initial_states[n][0], lengths)
            c_last = _at_lengths(cs[:, n], initial_states[n][1], lengths)
            valid = tf.sequence_mask(lengths, tf.shape(h_seq)[1])[:, :, None]
            if backwards:
                # Read order: the padding first (output 0), then the real steps reversed.
                outputs = tf.reverse(tf.reverse_sequence(
                    tf.where(valid, h_seq, tf.zeros_like(h_seq)), lengths, 1, 0), [1])
            else:
                # Masked steps repeat the last output (Keras: zeros before any real step).
                held = tf.zeros_like(h_seq)
                if not zero_output_for_mask:
                    held = tf.where(lengths[:, None, None] > 0, h_last[:, None], held)
                outputs = tf.where(valid, h_seq, held)
        results.append((outputs[:, -1], outputs, [h_last, c_last]))
    return results


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
