"""Looking inside a recurrent layer: gate activations and gradient flow over time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from lstm_tf.lstm import LSTM


def gate_activations(layer: LSTM, sequences: Any, mask: Any = None) -> dict[str, tf.Tensor]:
    """Runs `layer` (inference mode, zero initial state) and records its gates.

    Args:
        layer: A built `lstm_tf.LSTM`.
        sequences: `(batch, timesteps, features)`, the layer's input.
        mask: Optional boolean `(batch, timesteps)`; masked steps keep the state.

    Returns:
        `{"forget": f, "input": i, "output": o}`, each `(batch, timesteps,
        units)` in the order the layer read the steps (reversed if
        `go_backwards`), plus `"mask"` `(batch, timesteps)` in that order.
    """
    cell = layer.cell
    x = tf.convert_to_tensor(sequences, dtype=cell.compute_dtype)
    steps = tf.ones(tf.shape(x)[:2], tf.bool) if mask is None else tf.cast(mask, tf.bool)
    if layer.go_backwards:
        x, steps = tf.reverse(x, [1]), tf.reverse(steps, [1])
    h, c = cell.get_initial_state(tf.shape(x)[0])
    recorded: dict[str, list] = {"forget": [], "input": [], "output": []}
    for t in range(x.shape[1]):
        f, i, c_candidate, o = cell.gates(x[:, t], h)
        keep = steps[:, t, None]
        c = tf.where(keep, f * c + i * c_candidate, c)
        h = tf.where(keep, o * cell.activation(c), h)
        for name, gate in (("forget", f), ("input", i), ("output", o)):
            recorded[name].append(gate)
    gates = {name: tf.stack(values, axis=1) for name, values in recorded.items()}
    gates["mask"] = steps
    return gates


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
