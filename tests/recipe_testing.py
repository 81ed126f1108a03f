"""What the recipe tests share: the command line, parsed configs, errors, TensorBoard tags,
finished runs."""

import importlib
import json
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import tensorflow as tf
from absl import flags

from recipes.common import cli
from recipes.common.errors import RecipeError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_recipe(module: str, *args: str, check: bool = True, cwd=ROOT,
               stderr=subprocess.PIPE, **kwargs):
    """`python -m recipes.MODULE ARGS` in a fresh process; raises with its stderr on failure.

    (`stderr=subprocess.STDOUT`: both in `stdout`.)"""
    proc = subprocess.run([sys.executable, "-m", f"recipes.{module}", *args], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=stderr, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError((proc.stderr or proc.stdout)[-3000:])
    return proc


def parse_config(recipe: str, *args: str):  # noqa: ANN201
    """The config that `python -m recipes.RECIPE ARGS` would run, parsed in this process.

    A bad `--config` file, variant, override or flag raises the recipe's `RecipeError`.
    """
    argv = ["recipes." + recipe, *args]
    flag_values = flags.FlagValues()
    holder = cli.define_config("config", str(ROOT / "configs" / f"{recipe}.py"), "config",
                               flag_values=flag_values, sys_argv=argv)
    cli.parse_flags(argv, flag_values)
    holder.value.to_dict()  # (ml_collections defers a config file's errors to first use)
    return holder.value


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 1800,
               interval: float = 0.02) -> bool:
    """Polls `condition` until it holds, `proc` exits or `timeout` passes; returns it.

    (`timeout` only guards against a hung process: a slow machine may take minutes
    to reach what a test waits for.)
    """
    deadline = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(interval)
    return condition()


def assert_one_line_error(proc, message: str) -> None:
    """Exit status 2, last line `error: ...MESSAGE...`, no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def summary_tags(logdir: pathlib.Path) -> set[str]:
    """Every summary tag in the event files under `logdir`."""
    tags = set()
    for path in pathlib.Path(logdir).rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(v.tag for v in event.summary.value)
    return tags


def _files(workdir: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in workdir.rglob("*")}


def assert_finished_run_stays_finished(recipe: str, variant: str, workdir: pathlib.Path,
                                       capsys) -> None:
    """`train_and_evaluate` again on the finished run in `workdir` (`configs/RECIPE.py:VARIANT`)
    writes nothing (no training, no export) and returns its metrics.json, printed in one
    line; with another config, it is refused in one line, and writes nothing either."""
    config = importlib.import_module(f"configs.{recipe}").get_config(variant)
    train = importlib.import_module(f"recipes.{recipe}.train")
    before = _files(workdir)
    capsys.readouterr()
    metrics = train.train_and_evaluate(config, str(workdir))
    assert metrics == json.loads((workdir / "metrics.json").read_text())
    assert _files(workdir) == before
    [line] = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(f"{workdir.resolve()} is a finished run (to train it again, "
                           "delete its metrics.json): ")
    assert line.endswith(f"; export {workdir.resolve() / 'export' / '1'}")

    config.seed += 1
    with pytest.raises(RecipeError, match=r"holds a finished run with another config \(its "
                                          r"config.json differs in seed\); pass another"):
        train.train_and_evaluate(config, str(workdir))
    assert _files(workdir) == before
