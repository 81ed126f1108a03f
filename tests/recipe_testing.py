"""What the recipe tests share: running a recipe, one-line errors, TensorBoard tags."""

import pathlib
import subprocess
import sys
import time
from collections.abc import Callable

import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_recipe(module: str, *args: str, check: bool = True, cwd=ROOT, **kwargs):
    """`python -m recipes.MODULE ARGS` in a fresh process; raises with its stderr on failure."""
    proc = subprocess.run([sys.executable, "-m", f"recipes.{module}", *args], cwd=cwd,
                          capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120,
               interval: float = 0.02) -> bool:
    """Polls `condition` until it holds, `proc` exits or `timeout` passes; returns it."""
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
