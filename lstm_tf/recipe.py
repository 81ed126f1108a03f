"""What every recipe shares: errors, flags, workdir, data, callbacks, export.

Recipes are laid out like google/flax `examples/`: `recipes/NAME/__main__.py`
(thin absl entry point) calls `train.train_and_evaluate(config, workdir, strategy)`,
which uses the helpers below so that no recipe copies another.

Every recipe has the flags defined here: `--strategy` (tf.distribute),
`--cpu_devices` and `--deterministic`.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
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

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "default", STRATEGIES,
    "tf.distribute strategy: default (one device), mirrored (all local GPUs, else all "
    "logical CPUs), multi_worker (MultiWorkerMirroredStrategy, cluster from TF_CONFIG), "
    "tpu (TPUStrategy, --tpu=NAME). The config's batch size is the global batch size.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Split the CPU into this many logical devices (0: leave it as one); "
    "with --strategy=mirrored on a machine without GPUs, one replica per device.")
_TPU = flags.DEFINE_string("tpu", "", "For --strategy=tpu: the TPU name or grpc:// address "
                           "('' : the local TPU VM).")
_DETERMINISTIC = flags.DEFINE_bool(
    "deterministic", False, "tf.config.experimental.enable_op_determinism(): the same "
    "command gives bitwise the same run, also when killed and resumed (slower).")


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
    file that is not there, a full disk). A lost worker of a multi-worker
    cluster is reported as one line too.
    """

    def wrapped(argv: list[str]) -> Any:
        try:
            if _DETERMINISTIC.value:
                tf.config.experimental.enable_op_determinism()
            global _strategy
            _strategy = make_strategy(_STRATEGY.value, _CPU_DEVICES.value, _TPU.value)
            return main(argv)
        except RecipeError as e:
            _exit_with(str(e))
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as e:
            if _STRATEGY.value != "multi_worker":
                raise
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            at = next((i for i, line in enumerate(lines) if "aborted by" in line), 0)
            cause = " ".join(lines[at:at + 2]) if lines[at].endswith(":") else lines[at]
            _exit_with(f"lost a worker of the cluster ({type(e).__name__}: {cause}); "
                       "restart every worker with the same command to resume from the last backup")
        except (OSError, RuntimeError, tf.errors.OpError) as e:
            if "No space left on device" in str(e):  # as h5py, TF and Python report it
                where = re.search(r"filename = '([^']+)'", str(e))
                print("error: no space left on device" + (f" writing {where[1]}" if where else "")
                      + "; free some space or pass a --workdir on another disk, then rerun "
                      "the same command to resume", file=sys.stderr, flush=True)
                os._exit(2)  # not sys.exit: h5py's cleanup would print more errors
            if not isinstance(e, OSError):
                raise
            _exit_with(_last_line(e))

    app.run(wrapped, flags_parser=_parse_flags)


_strategy: tf.distribute.Strategy | None = None


def make_strategy(name: str, cpu_devices: int = 0, tpu: str = "") -> tf.distribute.Strategy:
    """The `tf.distribute` strategy called `name` (one of `STRATEGIES`).

    Call it before any other TensorFlow work (MultiWorkerMirroredStrategy and
    logical devices must be set up first).
    """
    if cpu_devices < 0:
        raise RecipeError(f"--cpu_devices={cpu_devices} is invalid: it must be >= 0")
    if cpu_devices > 1:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise RecipeError("--strategy=multi_worker needs the cluster in TF_CONFIG "
                              "(README: Distributed training)")
        return _MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise RecipeError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})")


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` with a `reduce` that Keras 3's `fit` can use.

    Keras 3.15 calls it (1) on its whole first batch, a nest, to build the
    model, which this strategy rejects ("Attempt to convert a value
    (PerReplica..."; keras-team/keras#20585), and (2) with `axis=0` on the
    scalar loss and metrics of each step ("Invalid reduction dimension 0").
    Here each tensor is reduced alone, and scalars across replicas only.
    """

    def reduce(self, reduce_op: Any, value: Any, axis: Any) -> Any:
        parent = super()

        def reduce_one(v: Any) -> Any:
            rank = self.experimental_local_results(v)[0].shape.rank
            return parent.reduce(reduce_op, v, axis=None if rank == 0 else axis)

        return tf.nest.map_structure(reduce_one, value)


def strategy_from_flags() -> tf.distribute.Strategy:
    """The strategy that `run` made from `--strategy` (the default one outside `run`)."""
    return _strategy or tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files (summaries, metrics, export)."""
    return strategy.extended.should_checkpoint


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with `AutoShardPolicy.DATA` for multi-worker runs.

    Every worker reads all the data and keeps its share of each global batch,
    so N workers train on the same batches as one process (file-based
    sharding would give each worker other files, and other batch counts).
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


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


def start_run(config: Any, workdir: str,
              strategy: tf.distribute.Strategy | None = None) -> pathlib.Path:
    """Prepares the workdir, writes the resolved `config.json` there and seeds everything.

    Returns the directory this process writes to: `workdir` for the chief;
    for the other workers of a multi-worker run, their own scratch directory
    `workdir/workers/<task>` (backups and checkpoints, which every worker
    needs to resume; nothing there is a result).
    """
    path = prepare_workdir(workdir)
    strategy = strategy or tf.distribute.get_strategy()
    if not is_chief(strategy):
        resolver = strategy.cluster_resolver
        path = prepare_workdir(str(path / "workers" / f"{resolver.task_type}-{resolver.task_id}"))
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
                       early_stopping_patience: int = 0,
                       strategy: tf.distribute.Strategy | None = None,
                       ) -> list[keras.callbacks.Callback]:
    """NaN check, TensorBoard, best checkpoint, resumable backups, optional early stopping.

    Layout under `workdir` (from `start_run`): `tensorboard/` (event files),
    `checkpoints/best.weights.h5` (best `monitor` so far, with `best.json`),
    `backup/` (what a killed run resumes from; deleted when training completes;
    see `backup_dir`). Put callbacks that add to the logs (e.g. `val_*`) before these.
    """
    strategy = strategy or tf.distribute.get_strategy()
    backup = backup_dir(workdir, strategy)
    return [
        StopOnNaN(),
        # update_freq="epoch": with an integer, Keras 3.15 leaves its record_if on at
        # epoch end and drops the epoch summaries (its own and other callbacks').
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
            self.best = json.loads(self.record.read_text())["best"]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        best = self.best
        super().on_epoch_end(epoch, logs)
        if self.best != best:  # improved: the weights were just written to the temporary file
            os.replace(self.filepath, self.path)
            write_json(self.record, {"monitor": self.monitor, "best": float(self.best),
                                     "epoch": epoch + 1})


class Backup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` that writes atomically and restores the random state too.

    Keras rewrites its weights file and then its metadata file in place, so a
    kill during a backup can leave weights and epoch from different epochs;
    and it does not save the layers' `SeedGenerator` states (dropout), so a
    resumed run draws other dropout masks than an uninterrupted one. Here each
    backup is written to `backup_dir/.tmp`, then renamed to `backup_dir/state`
    (the previous one is kept as `state.old` until then), and the metadata
    holds the seed states. The number of completed epochs is
    `completed_epochs(backup_dir)`, for input pipelines to skip what was seen.
    With `save=False` (the workers other than the chief), it only restores.
    """

    def __init__(self, backup_dir: pathlib.Path, save: bool = True) -> None:
        super().__init__(str(backup_dir / "state"))
        self.root, self.save = backup_dir, save

    def _load_model(self) -> None:
        _recover_backup(self.root)
        super()._load_model()
        metadata = pathlib.Path(self._training_metadata_path)
        if metadata.exists():
            states = json.loads(metadata.read_text()).get("seed_states", {})
            for variable in _seed_states(self.model):
                if variable.path in states:
                    variable.assign(states[variable.path])

    def _save_model(self) -> None:
        if not self.save:
            return
        tmp = self.root / ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_weights(str(tmp / "latest.weights.h5"))
        write_json(tmp / "training_metadata.json", {
            "epoch": self._current_epoch, "batch": self._last_batch_seen,
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


def _recover_backup(root: pathlib.Path) -> None:
    """Completes a backup swap that a kill interrupted (see `Backup`)."""
    state, old = root / "state", root / "state.old"
    if not state.exists() and old.exists():
        os.rename(old, state)


def completed_epochs(backup_dir: pathlib.Path) -> int:
    """How many epochs the backup in `backup_dir` holds (0 without one)."""
    _recover_backup(backup_dir)
    metadata = backup_dir / "state" / "training_metadata.json"
    return json.loads(metadata.read_text())["epoch"] if metadata.exists() else 0


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
    for stale in root.glob(".tmp-*"):  # left by a run killed while exporting
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{version}-{os.getpid()}"
    try:
        write(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
        scalars["learning_rate"] = self.model.optimizer.learning_rate.numpy()
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
