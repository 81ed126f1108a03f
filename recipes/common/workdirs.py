"""A run's directory: created and checked, locked while in use, its config and JSON files."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from recipes.common.distribute import is_chief
from recipes.common.errors import RecipeError

_locks: dict[pathlib.Path, Any] = {}  # open lock files: held until released or exit


def default_workdir(recipe: str) -> str:
    """`runs/<recipe>/<timestamp>` under the current directory."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", recipe, stamp)


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
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


def lock_workdir(path: pathlib.Path) -> None:
    """Claims `path` for this process (until `unlock_workdir` or exit); `RecipeError`
    if another process has it.

    An advisory `flock` on `path/.lock` (released by the kernel when the process
    ends, however it ends, so a killed run leaves no stale lock).
    """
    if path in _locks:
        return
    lock = open(path / ".lock", "a+")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _holder(lock)
        lock.close()
        raise RecipeError(f"{path} is in use by {owner}; wait for it to finish "
                          "or pass another --workdir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    _locks[path] = lock


def _holder(lock: Any) -> str:
    """Who holds `lock`: "process PID" (the holder writes its pid just after taking the
    lock, so it is read until it is there, for up to a second)."""
    for _ in range(50):
        lock.seek(0)
        pid = lock.read().strip()
        if pid:
            return f"process {pid}"
        time.sleep(0.02)
    return "another process"


@contextlib.contextmanager
def locked(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """`lock_workdir(path)` for the body of a `with` (released however it ends)."""
    lock_workdir(path)
    try:
        yield path
    finally:
        unlock_workdir(path)


def unlock_workdir(path: pathlib.Path) -> None:
    """Releases `lock_workdir(path)` (the end of a run or an export; exiting also does)."""
    lock = _locks.pop(path, None)
    if lock is not None:
        lock.close()


def start_run(config: Any, workdir: str,
              strategy: tf.distribute.Strategy | None = None) -> pathlib.Path:
    """Prepares and locks the workdir, writes the resolved `config.json`, seeds everything.

    Returns the directory this process writes to: `workdir` for the chief;
    for the other workers of a multi-worker run, their own scratch directory
    `workdir/workers/<task>` (backups and checkpoints, which every worker
    needs to resume; nothing there is a result).
    """
    path = prepare_workdir(workdir)
    strategy = strategy or tf.distribute.get_strategy()
    if not is_chief(strategy):
        resolver = strategy.cluster_resolver
        path = prepare_workdir(path / "workers" / f"{resolver.task_type}-{resolver.task_id}")
    lock_workdir(path)
    write_json(path / "config.json", config.to_dict())
    keras.utils.set_random_seed(config.seed)
    return path


def finish_run(workdir: pathlib.Path, metrics: dict[str, Any], start: float,
               train_seconds: float) -> dict[str, Any]:
    """Ends a run: adds its times to `metrics` (`start`: when its `train_and_evaluate` began,
    a `time.time()`), writes them to metrics.json (from then on the run is finished:
    `finished_metrics`), releases the workdir and prints `result_line`. Returns `metrics`."""
    metrics["train_seconds"] = round(train_seconds, 1)
    metrics["wall_seconds"] = round(time.time() - start, 1)
    write_json(workdir / "metrics.json", metrics)
    unlock_workdir(workdir)
    print(result_line(metrics))
    return metrics


def finished_metrics(config: Any, workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The metrics of the run that finished in `workdir` (its metrics.json), printed in one
    line; None if no run finished there (none started, or one was interrupted: it resumes).

    A finished run stays finished: running its command again trains and exports nothing.
    To train it again on purpose, delete WORKDIR/metrics.json (a new export version is
    added). `RecipeError` if `config` is not the finished run's (its config.json).
    """
    path = pathlib.Path(workdir).expanduser().resolve()
    if not (path / "metrics.json").is_file():
        return None
    metrics = read_json(path / "metrics.json")
    ran = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    wanted = json.loads(json.dumps(config.to_dict()))
    changed = sorted(k for k in ran.keys() | wanted.keys() if ran.get(k) != wanted.get(k))
    if ran and changed:
        raise RecipeError(
            f"{path} holds a finished run with another config (its config.json differs in "
            f"{', '.join(changed)}); pass another --workdir, or delete "
            f"{path / 'metrics.json'} to train it again with this config")
    print(f"{path} is a finished run (to train it again, delete its metrics.json): "
          f"{result_line(metrics)}", flush=True)
    return metrics


def result_line(metrics: dict[str, Any]) -> str:
    """A run's metrics.json in one line: its test (else eval, else validation) metrics and
    its export (the chief's)."""
    split = next(s for s in ("test", "eval", "validation") if s in metrics)
    values = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in metrics[split].items())
    return f"{split} {values}" + (f"; export {metrics['export']}" if "export" in metrics else "")


def write_json(path: pathlib.Path, obj: Any) -> None:
    """Writes JSON atomically: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: pathlib.Path) -> Any:
    """A JSON file this project wrote; `RecipeError` naming it if it is damaged."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path} is damaged ({type(e).__name__}: {e}); delete it "
                          "(or its run directory) and rerun") from None
