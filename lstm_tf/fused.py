"""The fused LSTM sequence path: the same maths as `LSTMCell`, fewer ops per step.

What makes it fast on a CPU (measured in `benchmarks/lstm_throughput.py`):

* The input projection x_t·W + b of every step is one large matmul before the
  loop; only h_{t-1}·U stays inside it.
* A hand-written gradient (`tf.custom_gradient`) for the whole recurrence: the
  forward loop keeps h_t, C_t and the pre-activations z_t; the backward pass
  turns them into every step's gate derivatives in bulk (element-wise over all
  steps at once), so its loop is a handful of element-wise ops and dz_t·Uᵀ;
  the weight gradient Σ_t h_{t-1}ᵀ·dz_t is one matmul after the loop.
* Masks become per-sequence lengths: the loop runs unmasked and the final
  state is gathered at each sequence's last real step; the backward direction
  reads each sequence reversed up to its length (`tf.reverse_sequence`).
* Several directions (a `Bidirectional`'s two) run in the same loop as one
  batched matmul per step, not one after the other.
* No copies of whole-sequence tensors inside the loop machinery: steps are
  read by index, written to `TensorArray`s, and read backwards by index.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


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
    steps = tf.shape(xz)[0]

    def forward_body(t, h, c, hs, cs, zs):
        z = xz[t] + tf.matmul(h, recurrent_kernel)
        i, f, c_candidate, o = _gates(z)
        c = f * c + i * c_candidate
        h = o * tf.tanh(c)
        return t + 1, h, c, hs.write(t, h), cs.write(t, c), zs.write(t, z)

    arrays = [tf.TensorArray(xz.dtype, size=steps) for _ in range(3)]
    _, _, _, hs, cs, zs = tf.while_loop(
        lambda t, *_: t < steps, forward_body, [0, h0, c0, *arrays])
    # (The gradient must capture plain tensors, not TensorArrays, so that
    # `model.export` can save a model that holds this function.)
    hs, cs, zs = hs.stack(), cs.stack(), zs.stack()

    def grad(d_hs: tf.Tensor, d_cs: tf.Tensor) -> tuple[Any, ...]:
        # Every step's gate derivatives at once, from the saved pre-activations.
        i, f, g, o = _gates(zs)
        c_prev = tf.concat([c0[None], cs[:-1]], 0)
        tanh_c = tf.tanh(cs)
        # Per step: dh = dH_t + dh_rec; dC = dC_t + dC_rec + dh·o·(1 - tanh²C_t);
        # dz_o = dh·tanh(C_t)·o(1-o); (dz_i, dz_f, dz_c) = dC·(g·i(1-i), C_{t-1}·f(1-f), i(1-g²)).
        a_c = o * (1 - tanh_c * tanh_c)
        a_o = tanh_c * o * (1 - o)
        a_ifc = tf.concat([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], -1)
        # matmul(dz, Uᵀ) with Uᵀ made once: transpose_b inside the loop is ~2x slower.
        kernel_t = tf.transpose(recurrent_kernel, [0, 2, 1])

        def backward_body(k, dh_rec, dc_rec, dzs):
            t = steps - 1 - k
            dh = d_hs[t] + dh_rec
            dc = d_cs[t] + dc_rec + dh * a_c[t]
            dz = tf.concat([tf.tile(dc, [1, 1, 3]) * a_ifc[t], dh * a_o[t]], -1)
            return k + 1, tf.matmul(dz, kernel_t), dc * f[t], dzs.write(t, dz)

        zeros = tf.zeros_like(h0)
        _, dh0, dc0, dzs = tf.while_loop(
            lambda k, *_: k < steps, backward_body,
            [0, zeros, zeros, tf.TensorArray(xz.dtype, size=steps)])
        dz = dzs.stack()
        # Σ_t h_{t-1}ᵀ·dz_t, one matmul per direction.
        h_prev = tf.concat([h0[None], hs[:-1]], 0)
        d_kernel = tf.einsum("tnbu,tnbk->nuk", h_prev, dz)
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
    # Stacking one tensor would copy it: a reshape does not.
    stack = lambda ts, axis=0: tf.expand_dims(ts[0], axis) if len(ts) == 1 else tf.stack(  # noqa: E731
        ts, axis)
    hs, cs = recurrence(stack(projections, 1), stack([s[0] for s in initial_states]),
                        stack([s[1] for s in initial_states]), stack(recurrent_kernels))
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
