"""What every recipe shares: errors, workdir, data loading, callbacks, export.

Recipes are laid out like google/flax `examples/`: `recipes/NAME/__main__.py`
(thin absl entry point) calls `train.train_and_evaluate(config, workdir)`,
which uses the helpers below so that no recipe copies another.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags


class RecipeError(Exception):
    """A user mistake (bad flag, missing data, ...): reported as one line."""


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _last_line(e: BaseException) -> str:
    """The informative line of a (possibly multi-line, traceback-quoting) message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = lines[-1] if lines else type(e).__name__
    quoted = len(line) > 1 and line[0] == line[-1] and line[0] in "\"'"
    return line[1:-1] if quoted else line


def define_config(name: str, default: str, help_text: str) -> Any:
    """`config_flags.DEFINE_config_file`, with a bad `--NAME.FIELD=` as one line.

    (ml_collections applies overrides while defining the flag.)
    """
    try:
        return config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
    except (KeyError, AttributeError) as e:
        _exit_with(f"bad --{name}.FIELD override: no field {_last_line(e)} in the config")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        first, last = str(e).splitlines()[0], _last_line(e)
        _exit_with(f"{first if first == last else first + ' ' + last} (see --helpshort)")
    except (KeyError, AttributeError) as e:  # ml_collections: --config.FIELD not in the config
        _exit_with(f"bad --config.FIELD override: no field {_last_line(e)} in the config")
    raise AssertionError("unreachable")


def run(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)` where user mistakes exit with one line, code 2.

    User mistakes are `RecipeError`s, bad flags, and `OSError`s (a config
    file that is not there, a full disk).
    """

    def wrapped(argv: list[str]) -> Any:
        try:
            return main(argv)
        except RecipeError as e:
            _exit_with(str(e))
        except OSError as e:
            _exit_with(_last_line(e))

    app.run(wrapped, flags_parser=_parse_flags)


def default_workdir(recipe: str) -> str:
    """`runs/<recipe>/<timestamp>` under the current directory."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", recipe, stamp)


def prepare_workdir(workdir: str) -> pathlib.Path:
    """Creates `workdir` (if needed) and checks that it is writable."""
    path = pathlib.Path(workdir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise RecipeError(
            f"cannot write to workdir {path} ({e.strerror or e}); pass a writable --workdir"
        ) from None
    return path


def start_run(config: Any, workdir: str) -> pathlib.Path:
    """Prepares `workdir`, writes the resolved `config.json` there and seeds everything."""
    path = prepare_workdir(workdir)
    write_json(path / "config.json", config.to_dict())
    keras.utils.set_random_seed(config.seed)
    return path


def write_json(path: pathlib.Path, obj: Any) -> None:
    """Writes JSON atomically: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def data_dir(config_data_dir: str | None) -> str | None:
    """The TFDS data dir: the config field, else `TFDS_DATA_DIR`, else TFDS's default."""
    return config_data_dir or os.environ.get("TFDS_DATA_DIR") or None


def load_tfds(name: str, splits: list[str], config_data_dir: str | None,
              download: bool = True) -> list[tf.data.Dataset]:
    """Loads several splits like `tfds.load(..., try_gcs=False)`, with one-line errors.

    The ordinary TFDS path: where the data is not prepared and `download` is
    true, TFDS downloads and prepares it (from the source, not from GCS).
    """
    where = data_dir(config_data_dir)
    try:
        builder = tfds.builder(name, data_dir=where)
    except tfds.core.registered.DatasetNotFoundError:
        raise RecipeError(
            f"unknown TFDS dataset {name!r}; see `tfds.list_builders()` for the names"
        ) from None
    shown = where or "TFDS's default data dir"
    if not builder.is_prepared():
        if not download:
            raise RecipeError(
                f"dataset {name!r} is not prepared in {shown}; set TFDS_DATA_DIR or "
                "--config.data_dir to a directory that holds it (or allow the download)"
            )
        logging.info("%s is not in %s: downloading it with TFDS", name, shown)
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        except Exception as e:  # network errors come in many types
            raise RecipeError(
                f"dataset {name!r} is not in {shown} and downloading it failed "
                f"({type(e).__name__}); set TFDS_DATA_DIR or --config.data_dir to a "
                "directory with the prepared data"
            ) from None
    datasets = []
    for split in splits:
        try:
            datasets.append(builder.as_dataset(split=split, shuffle_files=False))
        except (ValueError, KeyError, AssertionError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError(f"bad split {split!r} for {name!r}: {first_line}") from None
    return datasets


def progress_verbosity() -> int:
    """Keras's progress bar on a terminal, one line per epoch otherwise."""
    return 1 if sys.stdout.isatty() else 2


def training_callbacks(workdir: pathlib.Path, monitor: str, mode: str,
                       early_stopping_patience: int = 0) -> list[keras.callbacks.Callback]:
    """TensorBoard, resumable backups, the best checkpoint, optional early stopping.

    Layout under `workdir`: `tensorboard/` (event files), `backup/` (what
    `BackupAndRestore` resumes a killed run from; deleted when training
    completes), `checkpoints/best.weights.h5` (best `monitor` so far).
    """
    (workdir / "checkpoints").mkdir(exist_ok=True)
    callbacks = [
        # update_freq="epoch": with an integer, Keras 3.15 leaves its record_if on at
        # epoch end and drops the epoch summaries (its own and other callbacks').
        keras.callbacks.TensorBoard(log_dir=str(workdir / "tensorboard")),
        keras.callbacks.BackupAndRestore(backup_dir=str(workdir / "backup")),
        keras.callbacks.ModelCheckpoint(
            str(best_checkpoint(workdir)), monitor=monitor, mode=mode,
            save_best_only=True, save_weights_only=True),
    ]
    if early_stopping_patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=early_stopping_patience))
    return callbacks


def best_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
    return workdir / "checkpoints" / "best.weights.h5"


def export_saved_model(write: Callable[[str], None], workdir: pathlib.Path) -> pathlib.Path:
    """Writes a new `workdir/export/<version>` atomically, as TF Serving expects.

    `write(path)` writes a SavedModel to `path`; it is written to a hidden
    temporary directory first and renamed into place only when complete, so a
    run killed mid-export leaves no half-written version behind.
    """
    root = workdir / "export"
    root.mkdir(exist_ok=True)
    versions = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    version = max(versions, default=0) + 1
    tmp = root / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(str(tmp))
    final = root / str(version)
    os.rename(tmp, final)
    return final


def latest_export(export_dir: str) -> pathlib.Path:
    """`export_dir` itself if it is a SavedModel, else its highest version."""
    path = pathlib.Path(export_dir).expanduser()
    if (path / "saved_model.pb").exists():
        return path
    versions = sorted((int(p.name), p) for p in path.glob("*") if p.name.isdigit()
                      and (p / "saved_model.pb").exists()) if path.is_dir() else []
    if not versions:
        raise RecipeError(
            f"no SavedModel in {path}; pass --export_dir=WORKDIR/export (or a version in it)"
        )
    return versions[-1][1]


def check_config(config: Any, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raises `RecipeError` naming the first field whose value breaks its rule."""
    for field, (ok, must) in rules.items():
        value = config[field]
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise RecipeError(f"--config.{field}={value!r} is invalid: it must be {must}")


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
        scalars["learning_rate"] = self.model.optimizer.learning_rate
        with self.writer.as_default():
            for tag, value in scalars.items():
                tf.summary.scalar(tag, float(value), step=epoch + 1)
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

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from lstm_tf.bidirectional import Bidirectional
        from lstm_tf.diagnostics import gate_activations
        from lstm_tf.lstm import LSTM

        if self.writer is None:
            self.writer = tf.summary.create_file_writer(self.logdir)
        with self.writer.as_default():
            for layer in self.model.layers:
                if isinstance(layer, Bidirectional):
                    parts = [("forward", layer.forward_layer), ("backward", layer.backward_layer)]
                elif isinstance(layer, LSTM):
                    parts = [("", layer)]
                else:
                    continue
                feeder = keras.Model(self.model.inputs, layer.input)
                sequences = feeder(self.inputs, training=False)
                mask = None
                if isinstance(sequences, (list, tuple)):  # a layer called with a mask
                    sequences, mask = sequences
                for direction, lstm in parts:
                    if not isinstance(lstm, LSTM):
                        continue
                    gates = gate_activations(lstm, sequences, mask)
                    for gate in ("forget", "input", "output"):
                        values = tf.boolean_mask(gates[gate], gates["mask"])
                        name = "/".join(p for p in (layer.name, direction, gate) if p)
                        tf.summary.histogram(f"gates/{name}", values, step=epoch + 1)
        self.writer.flush()
