"""Surviving faults: NaN stop, the best checkpoint, and resumable backups (Keras callbacks).

Layout under a run's workdir: `checkpoints/best.weights.h5` (best monitored
value so far, with `best.json`), `backup/state/` (what a killed run resumes
from; deleted when training completes).
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any

import keras
import tensorflow as tf

from recipes.common.distribute import is_chief
from recipes.common.errors import RecipeError
from recipes.common.workdirs import read_json, write_json


def training_callbacks(workdir: pathlib.Path, monitor: str, mode: str,
                       early_stopping_patience: int = 0,
                       strategy: tf.distribute.Strategy | None = None,
                       ) -> list[keras.callbacks.Callback]:
    """NaN check, TensorBoard, best checkpoint, resumable backups, optional early stopping.

    Layout under `workdir` (from `start_run`): `tensorboard/` (event files),
    `checkpoints/best.weights.h5` and `best.json`, `backup/` (see `backup_dir`).
    Put callbacks that add to the logs (e.g. `val_*`) before these.
    """
    strategy = strategy or tf.distribute.get_strategy()
    backup = backup_dir(workdir, strategy)
    return [
        StopOnNaN(),
        # update_freq="epoch": with an integer, Keras 3.15 leaves its record_if on at
        # epoch end and drops the epoch summaries (its own and other callbacks');
        # step-level scalars come from `summaries.StepSummaries` instead.
        keras.callbacks.TensorBoard(log_dir=str(workdir / "tensorboard")),
        BestCheckpoint(best_checkpoint(workdir), monitor=monitor, mode=mode, backup_dir=backup),
        # After BestCheckpoint, so that a backup includes its epoch.
        Backup(backup, save=is_chief(strategy)),
    ] + ([keras.callbacks.EarlyStopping(monitor=monitor, mode=mode,
                                        patience=early_stopping_patience)]
         if early_stopping_patience > 0 else [])


def backup_dir(workdir: pathlib.Path, strategy: tf.distribute.Strategy) -> pathlib.Path:
    """Where the run's backup is: the chief's `workdir/backup`, for every worker.

    The chief writes it and all workers restore from it, so that they resume
    from the same epoch: in a multi-worker run, the workdir must be on a
    file system that all workers share (as for Keras's `BackupAndRestore`).
    """
    return workdir / "backup" if is_chief(strategy) else workdir.parents[1] / "backup"


def best_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
    return workdir / "checkpoints" / "best.weights.h5"


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """Stops at the first NaN/Inf training loss with a one-line `RecipeError` naming the step.

    It raises (`raise_error=True`), so no later callback runs: the best
    checkpoint, the last backup and earlier exports stay as they were.
    """

    def __init__(self) -> None:
        super().__init__(raise_error=True)
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        try:
            super().on_batch_end(batch, logs)
        except RuntimeError:
            step = int(self.model.optimizer.iterations.numpy())
            raise RecipeError(
                f"training loss became {float(logs['loss'])} at step {step} (epoch "
                f"{self.epoch + 1}, batch {batch + 1}); stopped. The best checkpoint, the last "
                "backup (of the last completed epoch) and earlier exports are untouched; "
                "try a lower --config.learning_rate") from None


class BestCheckpoint(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint(save_best_only=True, save_weights_only=True)`, atomic and resumable.

    Keras writes into `path` in place (a kill mid-write leaves no good
    checkpoint) and forgets the best value on restart (a resumed run would
    overwrite a better checkpoint). Here the weights go to a temporary file
    renamed over `path`, and the best value is kept in `best.json` beside it,
    read back when a run resumes from the backup in `backup_dir`.
    """

    def __init__(self, path: pathlib.Path, monitor: str, mode: str,
                 backup_dir: pathlib.Path) -> None:
        self.path, self.record, self.backup_dir = path, path.with_name("best.json"), backup_dir
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(str(path.with_name(".best.weights.h5")), monitor=monitor, mode=mode,
                         save_best_only=True, save_weights_only=True)

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        resuming = completed_epochs(self.backup_dir) > 0
        if resuming and self.record.exists() and self.path.exists():
            self.best = read_json(self.record)["best"]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        best = self.best
        super().on_epoch_end(epoch, logs)
        if self.best != best:  # improved: the weights were just written to the temporary file
            os.replace(self.filepath, self.path)
            write_json(self.record, {"monitor": self.monitor, "best": float(self.best),
                                     "epoch": epoch + 1})


def restorable_state(root: pathlib.Path, recover: bool = False) -> pathlib.Path:
    """The backup to restore from: `root/state`, or `root/state.old` if a kill
    interrupted the swap between them (see `Backup`).

    With `recover` (the chief only: one process renames, the others read)
    the interrupted swap is completed.
    """
    state, old = root / "state", root / "state.old"
    if state.exists() or not old.exists():
        return state
    if not recover:
        return old
    os.rename(old, state)
    return state


def completed_epochs(backup_dir: pathlib.Path) -> int:
    """How many epochs the backup in `backup_dir` holds (0 without one).

    A damaged backup is a `RecipeError` naming it and what to do.
    """
    state = restorable_state(backup_dir)
    metadata = state / "training_metadata.json"
    if not metadata.exists():
        return 0
    try:
        return int(read_json(metadata)["epoch"])
    except (RecipeError, KeyError, TypeError, ValueError) as e:
        raise RecipeError(_damaged(state, backup_dir, e)) from None


def _damaged(state: pathlib.Path, root: pathlib.Path, error: BaseException) -> str:
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"the backup in {state} is damaged ({cause}); delete {root} and rerun to train "
            "from the start (checkpoints/ and export/ are kept)")


class Backup(keras.callbacks.Callback):
    """Resumable backups of the training state, written atomically, with the random state.

    At the end of each epoch, the model's weights (the optimizer's state and
    step count included) and `training_metadata.json` (the number of completed
    epochs and the layers' `SeedGenerator` states, which weights files leave
    out) are written to `backup_dir/.tmp`, then renamed to `backup_dir/state`
    (the previous one is kept as `state.old` until then), so that a kill at
    any moment leaves one whole backup. When training begins, both are
    restored from it: `fit` must be given `initial_epoch=completed_epochs(backup_dir)`,
    the number input pipelines use to skip what was seen. With `save=False`
    (the workers other than the chief), it only restores. A damaged backup
    stops the run with one line naming it. Training's end deletes the backup.

    Not Keras's `BackupAndRestore`: it rewrites its weights and metadata files
    in place (a kill can leave weights and epoch from different epochs), and
    without the seed states a resumed run draws other dropout masks than an
    uninterrupted one.
    """

    def __init__(self, backup_dir: pathlib.Path, save: bool = True) -> None:
        super().__init__()
        self.root, self.save = backup_dir, save
        self.first_epoch: int | None = None  # of this `fit`, until it is checked

    def on_train_begin(self, logs: dict | None = None) -> None:
        state = restorable_state(self.root, recover=self.save)
        self.first_epoch = completed_epochs(self.root)
        if not self.first_epoch:
            return
        try:
            if not self.model.optimizer.built:  # (else at the first step: its state would be lost)
                self.model.optimizer.build(self.model.trainable_variables)
            self.model.load_weights(str(state / "latest.weights.h5"))
            seed_states = read_json(state / "training_metadata.json").get("seed_states", {})
        except (OSError, ValueError, RecipeError) as e:
            raise RecipeError(_damaged(state, self.root, e)) from None
        for variable in _seed_states(self.model):
            if variable.path in seed_states:
                variable.assign(seed_states[variable.path])

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.first_epoch is not None and epoch != self.first_epoch:
            raise RuntimeError(f"fit starts at epoch {epoch}, its backup in {self.root} at "
                               f"{self.first_epoch}: pass fit(initial_epoch=completed_epochs(...))")
        self.first_epoch = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.save:
            return
        tmp = self.root / ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_weights(str(tmp / "latest.weights.h5"))
        write_json(tmp / "training_metadata.json", {
            "epoch": epoch + 1,
            "seed_states": {v.path: v.numpy().tolist() for v in _seed_states(self.model)}})
        state, old = self.root / "state", self.root / "state.old"
        if state.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(state, old)
        os.rename(tmp, state)
        shutil.rmtree(old, ignore_errors=True)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.save:
            shutil.rmtree(self.root, ignore_errors=True)


def _seed_states(model: keras.Model) -> list[Any]:
    """The models' `SeedGenerator` state variables (not in its weights files)."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]
