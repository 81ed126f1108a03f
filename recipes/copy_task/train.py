"""Training, evaluation, diagnostics and export: `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import math
import pathlib
import resource
import statistics
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from lstm_tf.diagnostics import gate_activations, state_gradient_norms
from recipes.common import checkpoints, distribute, errors, exports, summaries, workdirs
from recipes.copy_task import input_pipeline, plots
from recipes.copy_task import model as models

_positive_int = (lambda v: isinstance(v, int) and v > 0, "a positive integer")
CONFIG_RULES = {
    "delay": _positive_int,
    "copy_length": _positive_int,
    "num_symbols": (lambda v: isinstance(v, int) and v > 1, "an integer > 1"),
    "cell": (lambda v: v in (*models.LSTM_VARIANTS, "rnn", "gru"),
             f"one of {', '.join(repr(c) for c in (*models.LSTM_VARIANTS, 'rnn', 'gru'))}"),
    "chrono_max_delay": (lambda v: isinstance(v, int) and (v == 0 or v > 2), "0 or > 2"),
    "units": _positive_int,
    "batch_size": _positive_int,
    "optimizer": (lambda v: v in ("adam", "rmsprop"), "'adam' or 'rmsprop'"),
    "learning_rate": (lambda v: v > 0, "positive"),
    "clipnorm": (lambda v: v > 0, "positive"),
    "steps_per_epoch": _positive_int,
    "max_epochs": _positive_int,
    "max_train_minutes": (lambda v: v >= 0, ">= 0"),
    "curriculum_start": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "curriculum_growth": (lambda v: v > 1, "> 1"),
    "eval_size": _positive_int,
    "diagnostic_examples": _positive_int,
}


def gradient_flow(model: keras.Model, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """‖∂loss/∂h_t‖ for t = 1..T on a batch (see `lstm_tf.diagnostics`)."""
    embedded = model.get_layer("embedding")(inputs)
    head = model.get_layer("logits")

    def loss_fn(outputs: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            targets, head(outputs)))

    return state_gradient_norms(model.get_layer("rnn"), embedded, loss_fn).numpy()


def forget_gate_means(model: keras.Model, inputs: np.ndarray) -> np.ndarray | None:
    """The LSTM's mean forget-gate activation at each step (None for other cells)."""
    layer = model.get_layer("rnn")
    if not hasattr(layer.cell, "gates"):
        return None
    gates = gate_activations(layer, model.get_layer("embedding")(inputs))
    return tf.reduce_mean(gates["forget"], axis=[0, 2]).numpy()


def diagnostic_pictures(model: keras.Model, inputs: np.ndarray, targets: np.ndarray,
                        cell: str, title: str) -> tuple[np.ndarray, np.ndarray | None,
                                                        dict[str, bytes]]:
    """Gradient flow, the LSTM's mean forget gates (None for other cells) and their PNGs."""
    flow = gradient_flow(model, inputs, targets)
    pictures = {"gradient_flow": plots.line_plot(
        {cell: flow}, f"{title}: error signal reaching step t", "time step t",
        "‖∂loss/∂h_t‖", logy=True)}
    forget = forget_gate_means(model, inputs)
    if forget is not None:
        pictures["forget_gate"] = plots.line_plot(
            {cell: forget}, f"{title}: mean forget gate", "time step t", "mean f_t")
    return flow, forget, pictures


def write_diagnostics(model: keras.Model, inputs: np.ndarray, targets: np.ndarray,
                      workdir: pathlib.Path, cell: str) -> None:
    """The trained model's gradient flow and forget gates over time: diagnostics.json + PNGs."""
    flow, forget, pictures = diagnostic_pictures(model, inputs, targets, cell, "trained model")
    workdirs.write_json(workdir / "diagnostics.json", {
        "gradient_flow": flow.tolist(),
        "forget_gate_mean": None if forget is None else forget.tolist(),
    })
    for name, png in pictures.items():
        exports.write_atomically(lambda tmp, png=png: pathlib.Path(tmp).write_bytes(png),
                                 workdir / f"{name}.png")


class Curriculum(keras.callbacks.Callback):
    """Lengthens the training delay when an epoch's copied-symbol accuracy is high enough.

    Also puts `delay` (the training delay) and `val_baseline` into the logs.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        delay = int(self.model.curriculum_delay.numpy())
        logs["delay"] = delay
        logs["val_baseline"] = input_pipeline.baseline_loss(
            self.config.delay, self.config.copy_length, self.config.num_symbols)
        if delay < self.config.delay and logs["copied_accuracy"] >= \
                self.config.curriculum_threshold:
            longer = min(self.config.delay, math.ceil(delay * self.config.curriculum_growth))
            self.model.curriculum_delay.assign(longer)
            logging.info("epoch %d: curriculum delay %d -> %d", epoch + 1, delay, longer)


class Diagnostics(keras.callbacks.Callback):
    """Each epoch: gradient flow (and the LSTM's forget gates) over time, as TensorBoard images."""

    def __init__(self, logdir: str, inputs: np.ndarray, targets: np.ndarray, cell: str) -> None:
        super().__init__()
        self.inputs, self.targets, self.cell = inputs, targets, cell
        self.writer = tf.summary.create_file_writer(logdir)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        norms, _, images = diagnostic_pictures(self.model, self.inputs, self.targets,
                                               self.cell, f"epoch {epoch + 1}")
        with self.writer.as_default():
            for name, png in images.items():
                tf.summary.image(name, tf.image.decode_png(png)[None], step=epoch + 1)
            tf.summary.scalar("gradient_at_first_step", float(norms[0]), step=epoch + 1)
        self.writer.flush()


class StopWhenDone(keras.callbacks.Callback):
    """Stops when the held-out accuracy at the full delay reaches `stop_accuracy`, or on time."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.start = time.time()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        solved = (logs["delay"] == self.config.delay
                  and logs["val_copied_accuracy"] >= self.config.stop_accuracy)
        minutes = (time.time() - self.start) / 60
        if solved or 0 < self.config.max_train_minutes <= minutes:
            logging.info("stopping after epoch %d: %s", epoch + 1,
                         "solved" if solved else f"{minutes:.1f} minutes of training")
            self.model.stop_training = True


class StepTimer(keras.callbacks.Callback):
    """Seconds per training step: each epoch's batches, without validation."""

    def __init__(self) -> None:
        super().__init__()
        self.per_step: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.steps += 1
        self.end = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.per_step.append((self.end - self.start) / max(self.steps, 1))

    def seconds_per_step(self) -> float:
        """The median over epochs, leaving out the first (tracing) unless it is the only one."""
        return statistics.median(self.per_step[1:] or self.per_step)


def export(model: keras.Model, path: str) -> None:
    """SavedModel `serving_default`: `inputs` int32 `[batch, time]` → `predictions` int32."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="inputs")])
    def serve(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = model(inputs, training=False)
        return {"predictions": tf.argmax(logits, axis=-1, output_type=tf.int32)}

    archive.add_endpoint("serving_default", serve)
    archive.write_out(path, verbose=False)


def train_and_evaluate(config: Any, workdir: str,
                       strategy: tf.distribute.Strategy | None = None) -> dict[str, Any]:
    """Trains on fresh sequences (with the curriculum), evaluates on the held-out set, exports.

    Writes to `workdir`: config.json, tensorboard/, backup/ (while training),
    checkpoints/, metrics.json (with `peak_rss_mib`, the process's peak resident
    memory), diagnostics.json + gradient_flow.png + forget_gate.png (gradient flow
    and the LSTM's mean forget gate over time, final model) and export/<version>/
    (the chief only). Rerunning a killed run with the same workdir resumes it; rerunning a
    finished one returns its metrics.json (see `workdirs.finished_metrics`).
    `strategy` (default: the current one) replicates the model; the config's batch
    size is the global batch.

    Returns:
        The metrics written to metrics.json.
    """
    start = time.time()
    errors.check_config(config, CONFIG_RULES)
    if config.chrono and not config.cell.startswith("lstm"):
        raise errors.RecipeError(f"--config.chrono=True needs --config.cell=lstm "
                                 f"(got {config.cell!r})")
    if (finished := workdirs.finished_metrics(config, workdir)) is not None:
        return finished
    strategy = strategy or tf.distribute.get_strategy()
    workdir = workdirs.start_run(config, workdir, strategy)

    with strategy.scope():
        model = models.create_model(config)
        optimizer = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop}[
            config.optimizer]
        model.compile(optimizer=optimizer(config.learning_rate, clipnorm=config.clipnorm),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[models.copied_accuracy(config.copy_length)])
    first_delay = min(config.curriculum_start, config.delay) if config.curriculum_start else \
        config.delay
    model.curriculum_delay.assign(first_delay)  # a resumed run's backup overwrites it
    # A resumed run goes on with the epoch and the batches after the ones its backup has seen.
    first_epoch = checkpoints.completed_epochs(checkpoints.backup_dir(workdir, strategy))
    train_ds = distribute.shard_by_data(input_pipeline.training_symbols(
        config, first_batch=config.steps_per_epoch * first_epoch))
    eval_inputs, eval_targets = input_pipeline.held_out(config)
    eval_ds = distribute.shard_by_data(
        tf.data.Dataset.from_tensor_slices((eval_inputs, eval_targets)).batch(250))
    probe = eval_inputs[:config.diagnostic_examples], eval_targets[:config.diagnostic_examples]
    baseline = input_pipeline.baseline_loss(config.delay, config.copy_length, config.num_symbols)
    logdir = workdir / "tensorboard"
    timer = StepTimer()
    callbacks = [
        Curriculum(config),
        StopWhenDone(config),
        timer,
        *checkpoints.training_callbacks(workdir, monitor="val_loss", mode="min",
                                   strategy=strategy),
        summaries.EpochSummaries(logdir / "metrics", config.to_dict()),
        summaries.StepSummaries(logdir / "metrics", config.log_every_steps),
        Diagnostics(str(logdir / "diagnostics"), *probe, cell=config.cell),
    ]
    model.fit(train_ds, steps_per_epoch=config.steps_per_epoch, epochs=config.max_epochs,
              initial_epoch=first_epoch, validation_data=eval_ds, callbacks=callbacks,
              shuffle=False, verbose=summaries.progress_verbosity())
    train_seconds = time.time() - start

    # The training's own end state, before the best checkpoint (its weights and its
    # epoch's curriculum delay) is loaded for the evaluation.
    final_training_delay = int(model.curriculum_delay.numpy())
    steps = int(model.optimizer.iterations.numpy())  # restored from the backup on resume
    model.load_weights(checkpoints.best_checkpoint(workdir))
    evaluation = model.evaluate(eval_ds, return_dict=True, verbose=0)
    metrics = {
        "eval": {**evaluation, "baseline": baseline,
                 "loss_over_baseline": evaluation["loss"] / baseline},
        "epochs": steps // config.steps_per_epoch,
        "steps": steps,
        "final_training_delay": final_training_delay,
        "seconds_per_step": round(timer.seconds_per_step(), 4) if timer.per_step else None,
    }
    # The process's peak resident memory so far: the training steps' working set (plus the
    # interpreter and TensorFlow itself), measured the same way on every CPU.
    metrics["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    write_diagnostics(model, *probe, workdir=workdir, cell=config.cell)
    if distribute.is_chief(strategy):
        metrics["export"] = str(exports.export_saved_model(lambda path: export(model, path),
                                                          workdir))
    return workdirs.finish_run(workdir, metrics, start, train_seconds)
