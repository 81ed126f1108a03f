"""`Bidirectional`: a recurrent layer run in both directions."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

from lstm_tf import conversion, fused


@keras.saving.register_keras_serializable(package="lstm_tf")
class Bidirectional(keras.layers.Bidirectional):
    """Runs a recurrent layer left-to-right and right-to-left and merges them.

    The two directions are independent parts of one graph, which TensorFlow
    runs concurrently (with `lstm_tf.LSTM`, each on its fused path if it
    applies; in training on a CPU, each on one thread).

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

    Full-integer TFLite models: at inference in a graph (an export, a
    converter), `merge_mode="concat"` adds `0 * x` to each direction before
    joining them (exact for finite values). TFLite's int8 quantizer gives a
    concatenation's inputs the concatenation's scale and zero point without
    requantizing: the fused LSTM op keeps computing at its own (its state's) and
    the backward output's flip copies bytes, so both halves would be read with
    the wrong zero point. The added ADD is where the int8 model requantizes.
    Everything else (both directions, the flip, the states, Keras's fused
    bidirectional kernels where a backend has them) is Keras's `call`.
    """

    def call(self, sequences: Any, initial_state: Any = None, mask: Any = None,
             training: bool | None = None) -> Any:
        kwargs = {"initial_state": initial_state, "mask": mask, "training": training}
        if training:
            with fused.side_by_side():
                return super().call(sequences, **kwargs)
        if (self.merge_mode != "concat" or not tf.inside_function()
                or conversion.in_onnx_graph()):
            return super().call(sequences, **kwargs)
        # Keras's call without its merge (with merge_mode=None it returns both directions'
        # outputs, then the states; nothing else reads merge_mode while it runs), then
        # the concatenation with a requantization point on each input.
        self.merge_mode = None
        try:
            y, y_rev, *states = super().call(sequences, **kwargs)
        finally:
            self.merge_mode = "concat"
        output = ops.concatenate([y + 0.0 * y[..., :1], y_rev + 0.0 * y_rev[..., :1]],
                                 axis=-1)
        return (output, *states) if self.return_state else output
