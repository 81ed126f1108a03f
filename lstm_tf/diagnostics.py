"""Looking inside a recurrent layer: gate activations and gradient flow over time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from lstm_tf.lstm import LSTM


def trace(layer: LSTM, sequences: Any, mask: Any = None) -> dict[str, tf.Tensor]:
    """Runs `layer` (inference, zero initial state) and records every part of every step.

    Works in graph mode and for any number of steps (`tf.scan`), with every
    variant of the cell (its `step`). Values are aligned to the positions of the
    steps: for a `go_backwards` layer, position t holds what the layer computed
    when it read step t (its last step first). Masked steps keep the state, as
    in the layer, and record zeros.

    Args:
        layer: A built `lstm_tf.LSTM`.
        sequences: `(batch, timesteps, features)`, the layer's input.
        mask: Optional boolean `(batch, timesteps)`; masked steps keep the state.

    Returns:
        `{"forget", "input", "output", "cell", "hidden"}`: f_t, i_t, o_t, C_t and
        h_t (after zoneout, as the layer carries them), each `(batch, timesteps,
        units)` (h_t: `proj_size` wide with a projection), and `"mask"` `(batch, timesteps)` bool;
        in the variables' dtype (float32 under a mixed precision policy).
    """
    cell = layer.cell
    # In the variables' dtype: under a mixed precision policy too (float32 records of
    # the float32 weights; `cell.step`, called outside the layer, computes in their dtype).
    x = tf.cast(tf.convert_to_tensor(sequences), cell.variable_dtype)
    real = tf.ones(tf.shape(x)[:2], tf.bool) if mask is None else tf.cast(mask, tf.bool)
    if layer.go_backwards:
        x, real = tf.reverse(x, [1]), tf.reverse(real, [1])
    h0, c0 = (tf.cast(s, x.dtype) for s in cell.get_initial_state(tf.shape(x)[0]))
    names = ("forget", "input", "output", "cell", "hidden")

    def step(carried: tuple, inputs: tuple) -> tuple:
        h, c = carried[:2]
        x_t, keep = inputs
        parts = cell.step(x_t, h, c)
        # What the layer carries (at inference, zoneout keeps the expectation).
        parts["hidden"] = cell.zone_out(h, parts["hidden"], cell.zoneout_h)
        parts["cell"] = cell.zone_out(c, parts["cell"], cell.zoneout_c)
        keep = keep[:, None]
        h = tf.where(keep, parts["hidden"], h)
        c = tf.where(keep, parts["cell"], c)
        return (h, c, *(tf.where(keep, parts[n], tf.zeros_like(parts[n])) for n in names))

    units = tf.zeros_like(c0)
    start = (h0, c0, units, units, units, units, h0)
    steps = tf.scan(step, (tf.transpose(x, [1, 0, 2]), tf.transpose(real)), start)
    recorded = {name: tf.transpose(values, [1, 0, 2]) for name, values in zip(
        names, steps[2:], strict=True)}
    recorded["mask"] = real
    if layer.go_backwards:  # back to the positions of the steps
        recorded = {name: tf.reverse(values, [1]) for name, values in recorded.items()}
    return recorded


def gate_activations(layer: LSTM, sequences: Any, mask: Any = None) -> dict[str, tf.Tensor]:
    """The forget, input and output gates of every step, as `trace` records them.

    Returns:
        `{"forget": f, "input": i, "output": o}`, each `(batch, timesteps,
        units)`, aligned to the positions of the steps, plus `"mask"`.
    """
    recorded = trace(layer, sequences, mask)
    return {name: recorded[name] for name in ("forget", "input", "output", "mask")}


def state_gradient_norms(layer: Any, sequences: Any,
                         loss_fn: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """‖∂loss/∂h_t‖ for every step t: how much of the error signal reaches step t.

    Runs the cell of `layer` (any Keras RNN layer with a `cell`: `lstm_tf.LSTM`,
    `keras.layers.SimpleRNN`, `GRU`, ...; inference mode, zero initial state)
    step by step under a `GradientTape` and differentiates the loss with respect
    to each step's output h_t, through every path (the outputs at t and later,
    via the recurrence).

    Args:
        layer: A built RNN layer, run forwards.
        sequences: `(batch, timesteps, features)`, the layer's input.
        loss_fn: Maps the outputs `(batch, timesteps, units)` to a scalar loss.

    Returns:
        `(timesteps,)`: the Frobenius norm over batch and units of ∂loss/∂h_t.
    """
    cell = layer.cell
    x = tf.convert_to_tensor(sequences, dtype=cell.compute_dtype)
    states = cell.get_initial_state(tf.shape(x)[0])
    states = list(states) if isinstance(states, (list, tuple)) else [states]
    outputs = []
    with tf.GradientTape() as tape:
        for t in range(x.shape[1]):
            h, new_states = cell(x[:, t], states, training=False)
            new_states = list(new_states) if isinstance(new_states, (list, tuple)) else [
                new_states]
            states = [h, *new_states[1:]]  # h_t is the tensor every later step reads
            outputs.append(h)
        loss = loss_fn(tf.stack(outputs, axis=1))
    gradients = tape.gradient(loss, outputs)
    return tf.stack([tf.norm(g) for g in gradients])
