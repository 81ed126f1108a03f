"""Looking inside a trained LSTM: its gate activations over time."""

from __future__ import annotations

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
