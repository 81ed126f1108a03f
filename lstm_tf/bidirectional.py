"""`Bidirectional`: a recurrent layer run in both directions."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from lstm_tf import fused
from lstm_tf.lstm import LSTM


@keras.saving.register_keras_serializable(package="lstm_tf")
class Bidirectional(keras.layers.Bidirectional):
    """Runs a recurrent layer left-to-right and right-to-left and merges them.

    When both directions are `lstm_tf.LSTM`s that can use the fused path (see
    `LSTM`), they run together in one loop, one batched matmul per step.
    Otherwise each direction runs on its own, one after the other.

    The backward copy is the same layer rebuilt from its config with
    `go_backwards` flipped (or `backward_layer`, if given). Its outputs are
    flipped back so that position t of both directions lines up. With a
    right-padded, masked batch, masked steps leave the state unchanged, so the
    backward direction effectively starts at each sequence's last real token.

    Args:
        layer: A recurrent layer (`lstm_tf.LSTM`, `keras.layers.SimpleRNN`,
            ...): the forward direction.
        merge_mode: How to join the two outputs: `"concat"` (default),
            `"sum"`, `"mul"`, `"ave"` or `None` (a list of both).
        backward_layer: Optional explicit backward layer (must have
            `go_backwards=True`).

    Call arguments:
        sequences: `(batch, timesteps, features)`.
        initial_state: Optional list of the forward states then the backward
            states (for an LSTM: `[h_fw, C_fw, h_bw, C_bw]`).
        mask: Optional boolean `(batch, timesteps)`.
        training: Whether dropout applies.

    Returns:
        With `merge_mode="concat"`: `(batch, [timesteps,] 2 * units)`; with
        `return_state=True` the forward states then the backward states follow.

    Example:

    >>> Bidirectional(LSTM(8, return_sequences=True))(np.ones((2, 5, 3))).shape
    TensorShape([2, 5, 16])
    """

    def call(self, sequences: Any, initial_state: Any = None, mask: Any = None,
             training: Any = None) -> Any:
        layers = (self.forward_layer, self.backward_layer)
        if not (all(isinstance(layer, LSTM) and layer.can_fuse() for layer in layers)
                and not self.stateful):
            return super().call(sequences, initial_state=initial_state, mask=mask,
                                training=training)
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        if initial_state is None:
            zeros = tf.zeros([tf.shape(sequences)[0], self.forward_layer.units],
                             sequences.dtype)
            states = [[zeros, zeros], [zeros, zeros]]
        else:
            states = [list(initial_state[:2]), list(initial_state[2:])]
        xs = [layer.fused_inputs(sequences, training) for layer in layers]
        (f_last, f_seq, f_states), (b_last, b_seq, b_states) = fused.run(
            xs, [layer.cell.kernel for layer in layers],
            [layer.cell.recurrent_kernel for layer in layers],
            [layer.cell.bias for layer in layers], [layer.go_backwards for layer in layers],
            states, None if mask is None else fused.right_padded_lengths(mask),
            self.forward_layer.zero_output_for_mask)
        for layer in layers:
            layer.cell.reset_dropout_mask()
        if self.return_sequences:
            y, y_rev = f_seq, tf.reverse(b_seq, [1])
        else:
            y, y_rev = f_last, b_last
        if self.merge_mode == "concat":
            output = tf.concat([y, y_rev], -1)
        elif self.merge_mode == "sum":
            output = y + y_rev
        elif self.merge_mode == "ave":
            output = (y + y_rev) / 2
        elif self.merge_mode == "mul":
            output = y * y_rev
        else:
            output = (y, y_rev)
        if not self.return_state:
            return output
        states = (*f_states, *b_states)
        return (*output, *states) if self.merge_mode is None else (output, *states)
