"""`Bidirectional`: a recurrent layer run in both directions."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="lstm_tf")
class Bidirectional(keras.layers.Bidirectional):
    """Runs a recurrent layer left-to-right and right-to-left and merges them.

    The two directions are independent parts of one graph, which TensorFlow
    runs concurrently (with `lstm_tf.LSTM`, each on its fused path if it
    applies).

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
