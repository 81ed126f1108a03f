"""TensorBoard summaries beyond Keras's own: flax-style scalars, step scalars, gate histograms."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import keras
import tensorflow as tf

from lstm_tf.bidirectional import Bidirectional
from lstm_tf.diagnostics import gate_activations
from lstm_tf.lstm import LSTM


def progress_verbosity() -> int:
    """Keras's progress bar on a terminal, one line per epoch otherwise."""
    return 1 if sys.stdout.isatty() else 2


class EpochSummaries(keras.callbacks.Callback):
    """flax-style `train_*` / `eval_*` scalars per epoch, plus the hparams.

    Written to `logdir` next to the Keras `TensorBoard` callback's runs.
    """

    def __init__(self, logdir: pathlib.Path, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.logdir = str(logdir)
        self.hparams = {k: v for k, v in hparams.items()
                        if isinstance(v, (bool, int, float, str))}
        self.writer: Any = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        from tensorboard.plugins.hparams import api as hp

        self.writer = tf.summary.create_file_writer(self.logdir)
        with self.writer.as_default():
            hp.hparams(self.hparams)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        scalars = {("eval_" + k[4:] if k.startswith("val_") else "train_" + k): v
                   for k, v in (logs or {}).items()}
        scalars["learning_rate"] = self.model.optimizer.learning_rate.numpy()
        with self.writer.as_default():
            for tag, value in scalars.items():
                tf.summary.scalar(tag, float(value), step=epoch + 1)
        self.writer.flush()


class StepSummaries(keras.callbacks.Callback):
    """Training scalars every `every_steps` steps, so that a long epoch can be watched.

    Tags `steps/train_<metric>` at the optimizer's step: each is the running
    mean over the epoch so far (what Keras's progress bar shows).
    """

    def __init__(self, logdir: pathlib.Path, every_steps: int) -> None:
        super().__init__()
        self.logdir, self.every_steps = str(logdir), every_steps
        self.writer: Any = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        if self.every_steps <= 0 or step % self.every_steps:
            return
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(self.logdir)
        with self.writer.as_default():
            for name, value in (logs or {}).items():
                tf.summary.scalar(f"steps/train_{name}", float(value), step=step)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.writer is not None:
            self.writer.flush()


class GateHistograms(keras.callbacks.Callback):
    """Histograms of every `lstm_tf.LSTM`'s forget/input/output gates, each epoch.

    Computed on a fixed batch of model inputs (e.g. from the validation split)
    over the real (unmasked) steps, with `lstm_tf.diagnostics.gate_activations`.
    """

    def __init__(self, logdir: pathlib.Path, inputs: Any) -> None:
        super().__init__()
        self.logdir, self.inputs = str(logdir), inputs
        self.writer: Any = None
        self.gates: Any = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(self.logdir)
            # Traced once (it reads the weights as they are at each call): run
            # eagerly, the step-by-step trace would take seconds every epoch.
            self.gates = tf.function(self._gates)
        with self.writer.as_default():
            for name, values in self.gates(self.inputs).items():
                tf.summary.histogram(f"gates/{name}", values, step=epoch + 1)
        self.writer.flush()

    def _gates(self, inputs: Any) -> dict[str, tf.Tensor]:
        """`{"layer[/direction]/gate": the gate's values at the real steps}`."""
        values = {}
        for layer in self.model.layers:
            if isinstance(layer, Bidirectional):
                parts = [("forward", layer.forward_layer), ("backward", layer.backward_layer)]
            elif isinstance(layer, LSTM):
                parts = [("", layer)]
            else:
                continue
            sequences = keras.Model(self.model.inputs, layer.input)(inputs, training=False)
            mask = None
            if isinstance(sequences, (list, tuple)):  # a layer called with a mask
                sequences, mask = sequences
            for direction, lstm in parts:
                if not isinstance(lstm, LSTM):
                    continue
                gates = gate_activations(lstm, sequences, mask)
                for gate in ("forget", "input", "output"):
                    name = "/".join(p for p in (layer.name, direction, gate) if p)
                    values[name] = tf.boolean_mask(gates[gate], gates["mask"])
        return values
