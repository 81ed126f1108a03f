"""`LSTM`: the LSTM sequence layer built on `LSTMCell`."""

from __future__ import annotations

import inspect
from typing import Any

import keras
import tensorflow as tf

from lstm_tf import conversion
from lstm_tf import fused as fused_lib
from lstm_tf.cell import LSTMCell

# Every `LSTMCell` constructor argument after `units` (not `**kwargs`).
_CELL_ARGS = tuple(inspect.signature(LSTMCell.__init__).parameters)[2:-1]


@keras.saving.register_keras_serializable(package="lstm_tf")
class LSTM(keras.layers.RNN):
    """Long short-term memory layer: `LSTMCell` run over a sequence.

    Weights, masking, `initial_state`, `stateful`/`reset_state()` and
    `go_backwards` behave exactly as in `keras.layers.LSTM`, so
    `layer.set_weights(keras_lstm.get_weights())` works in both directions.

    Args:
        units: Positive integer, size of the hidden and cell state.
        return_sequences: Return h_t for every step, `(batch, timesteps,
            units)`, instead of the last one, `(batch, units)`.
        return_state: Also return the final `h_T` and `C_T`.
        go_backwards: Read the sequence from the last step to the first (and
            return the outputs in that reversed order).
        stateful: Carry the final state of batch k into batch k+1 (needs a
            fixed batch size); clear it with `reset_state()`.
        unroll: Unroll the step loop (short sequences only).
        fused: `"auto"` (default) runs the fused path (`lstm_tf.fused`: the
            recurrence compiled by XLA, a hand-written gradient) wherever it
            applies, and the step-by-step `LSTMCell` loop elsewhere. Under
            a mixed precision policy the fused path keeps h and C in float32
            (the outputs and states it returns are in the compute dtype). `False`
            always runs the step loop; `True` the fused path wherever it
            applies (and raises where it does not). It applies to the plain cell (no variant) with
            `activation="tanh"`, `recurrent_activation="sigmoid"`,
            `unroll=False` and, in training, `recurrent_dropout=0`; with any
            mask. Both paths compute the same function
            (`docs/benchmarks.md`: how fast each is).
        **kwargs: Every `LSTMCell` argument (`activation`, `dropout`,
            `unit_forget_bias`, initializers, ...) and the usual layer
            arguments (`name`, `dtype`, ...).

    Call arguments:
        sequences: `(batch, timesteps, features)`.
        initial_state: Optional `[h_0, C_0]`, each `(batch, units)`.
        mask: Optional boolean `(batch, timesteps)`; masked steps keep the
            previous state (as produced by `Embedding(mask_zero=True)`).
        training: Whether dropout applies.

    Example:

    >>> x = np.random.rand(8, 20, 16).astype("float32")
    >>> LSTM(32, return_sequences=True)(x).shape
    TensorShape([8, 20, 32])
    """

    def __init__(
        self,
        units: int,
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        stateful: bool = False,
        unroll: bool = False,
        fused: bool | str = "auto",
        **kwargs: Any,
    ) -> None:
        if fused not in ("auto", True, False):
            raise ValueError(f"`fused` must be 'auto', True or False; got {fused!r}.")
        cell_kwargs = {k: kwargs.pop(k) for k in _CELL_ARGS if k in kwargs}
        cell = LSTMCell(
            units,
            **cell_kwargs,
            dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True),
            name="lstm_cell",
        )
        super().__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            **kwargs,
        )
        self.fused = fused
        if fused is True and not self.uses_fused_path():
            raise ValueError(
                "fused=True needs activation='tanh', recurrent_activation='sigmoid', "
                "recurrent_dropout=0, unroll=False and no variant (peepholes, layer norm, "
                "projection, zoneout).")

    @property
    def units(self) -> int:
        return self.cell.units

    def uses_fused_path(self, training: bool = True) -> bool:
        """Whether calls run on the fused path (`training`: training calls, else inference)."""
        cell = self.cell
        return (
            self.fused is not False
            and cell.activation is keras.activations.tanh
            and cell.recurrent_activation is keras.activations.sigmoid
            and (cell.recurrent_dropout == 0 or not training)
            and not self.unroll
            and cell.is_plain
        )

    def inner_loop(self, sequences: Any, initial_state: Any, mask: Any,
                   training: bool = False) -> tuple:
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        if not training and conversion.in_onnx_graph():
            reasons = conversion.unfusable_attributes(self, None)
            if not reasons:
                return conversion.run_onnx(self, sequences, list(initial_state), mask)
            conversion.warn_unfusable(self, reasons, "ONNX's LSTM op")
        if not training and tf.inside_function():
            # Inference in a graph (an export, a converter, `predict`): unmasked calls
            # go through the function TFLite's converter turns into its fused op.
            reasons = conversion.unfusable_attributes(self, mask)
            if not reasons:
                return conversion.run(self, sequences, list(initial_state),
                                      final_cell_state=self.return_state or self.stateful)
            if self._batch_size_at_build is not None:  # a fixed batch size: for a device?
                conversion.warn_unfusable(self, reasons)
        if not self.uses_fused_path(training):
            return self._step_loop(sequences, initial_state, mask, training)
        return self._fused(sequences, initial_state, mask, training)

    def _step_loop(self, sequences: Any, initial_state: Any, mask: Any,
                   training: bool) -> tuple:
        """`LSTMCell` step by step (`keras.layers.RNN`'s loop)."""
        def run() -> tuple:
            last_output, outputs, states = super(LSTM, self).inner_loop(
                sequences, initial_state, mask, training=training)
            return last_output, outputs, list(states)

        if sequences.shape[1]:
            return run()  # a known, positive number of steps
        # Zero steps: tf.distribute feeds `(0, 0, features)` batches to replicas
        # that have no data in a step (the last, partial batch): the state
        # stays the initial one, and there are no outputs.
        states = list(initial_state)
        nothing = lambda: (states[0], tf.zeros(  # noqa: E731
            [tf.shape(sequences)[0], 0, self.cell.output_size], sequences.dtype), states)
        return tf.cond(tf.shape(sequences)[1] > 0, run, nothing)

    def _fused(self, sequences: Any, initial_state: Any, mask: Any,
               training: bool) -> tuple:
        """`lstm_tf.fused.run` with this layer's weights (and input dropout)."""
        cell = self.cell
        if training and cell.dropout > 0:  # the same mask at every step
            sequences = sequences * cell.get_dropout_mask(sequences[:, 0, :])[:, None, :]
        return fused_lib.run(
            sequences, cell.kernel, cell.recurrent_kernel,
            cell.bias, self.go_backwards, list(initial_state), mask,
            self.zero_output_for_mask, bool(training),
            final_cell=self.return_state or self.stateful)

    def build(self, sequences_shape: tuple, initial_state_shape: Any = None) -> None:
        if len(sequences_shape) != 3:
            raise ValueError(
                f"{self.__class__.__name__} expects inputs of shape (batch, "
                f"timesteps, features); got shape {tuple(sequences_shape)}."
            )
        # (A model built with a fixed batch size is likely meant for TFLite: then
        # calls the fused op cannot express are warned about.)
        self._batch_size_at_build = sequences_shape[0]
        super().build(sequences_shape, initial_state_shape)

    def call(
        self,
        sequences: Any,
        initial_state: Any = None,
        mask: Any = None,
        training: bool = False,
    ) -> Any:
        if initial_state is not None:
            self._check_initial_state(sequences, initial_state)
        # Keras's RNN.call draws the cell's dropout masks before every call, training or
        # not. Nothing reads them at inference, where the draw (a seed-generator update)
        # would stay in exports and conversions (TFLite: a resource variable, CALL_ONCE).
        self.cell.inference_call = not training
        return super().call(
            sequences, initial_state=initial_state, mask=mask, training=training
        )

    def _check_initial_state(self, sequences: Any, initial_state: Any) -> None:
        states = initial_state if isinstance(initial_state, (list, tuple)) else [initial_state]
        batch = sequences.shape[0]
        sizes = self.cell.state_size
        if len(states) != 2:
            raise ValueError(
                f"initial_state must be [h_0, C_0], of shapes {[(batch, n) for n in sizes]}; "
                f"got {len(states)} tensor(s)."
            )
        for name, state, size in zip(("h_0", "C_0"), states, sizes, strict=True):
            shape = tuple(state.shape)
            ok = len(shape) == 2 and shape[1] == size
            ok = ok and (batch is None or shape[0] is None or shape[0] == batch)
            if not ok:
                raise ValueError(
                    f"initial_state {name} must have shape {(batch, size)} "
                    f"(batch, {'proj_size' if name == 'h_0' and self.cell.proj_size else 'units'}"
                    f"); got {shape}."
                )

    def get_config(self) -> dict:
        config = super().get_config()
        cell_config = config.pop("cell")["config"]
        config["units"] = self.units
        config["fused"] = self.fused
        config.update({k: cell_config[k] for k in _CELL_ARGS})
        return config

    @classmethod
    def from_config(cls, config: dict) -> LSTM:
        return cls(**config)
