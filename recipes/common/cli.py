"""The command line every recipe shares: its flags, config files, one-line errors.

Every recipe's `__main__` defines its own flags (`--workdir`, `--config`, ...)
and calls `run(main)`; the flags defined here (`--strategy`, `--cpu_devices`,
`--tpu`, `--deterministic`) come with it, and a quiet console (see `console`:
`--verbosity=0` shows absl's INFO messages). User mistakes (`RecipeError`, bad
flags, missing files) end the program with one `error: ...` line and exit
status 2, never a traceback.
"""

from __future__ import annotations

import ast
import functools
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

import tensorflow as tf
from absl import app, flags
from ml_collections import config_flags

from recipes.common import console, distribute
from recipes.common.errors import RecipeError

_STRATEGY = flags.DEFINE_enum(
    "strategy", "default", distribute.STRATEGIES,
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

_strategy: tf.distribute.Strategy | None = None


def _text(e: BaseException) -> str:
    """An exception's message as one line of text (a `KeyError`'s without repr quoting)."""
    message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    # ml_collections wraps a KeyError in an AttributeError (whose message is then the
    # KeyError's repr, line breaks escaped) and quotes the field in it: unquote twice at most.
    for _ in range(2):
        if len(message) > 1 and message[0] == message[-1] and message[0] in "\"'":
            try:
                message = str(ast.literal_eval(message))
            except (ValueError, SyntaxError):
                break
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


def _config_error(name: str, e: Exception) -> RecipeError:
    """A bad `--NAME` config file or `--NAME.FIELD=` override, as a `RecipeError`.

    The config file's line that raised is named.
    """
    # ml_collections raises the same KeyError or AttributeError for a field missing from an
    # override as the config file's own code may: only the latter ran in its `get_config`.
    config_file = [f for f in traceback.extract_tb(e.__traceback__) if f.name == "get_config"]
    if config_file:
        return RecipeError(f"the --{name} file raised {type(e).__name__}: {_text(e)} "
                           f"({config_file[0].filename}, line {config_file[0].lineno})")
    field, *hint = _text(e).split("; ")
    field = field.strip("\"'")
    return RecipeError(f"bad --{name}.FIELD override: no field {field!r} in the config"
                       + (f" ({' '.join(hint)})" if hint else ""))


def define_config(name: str, default: str, help_text: str,
                  flag_values: flags.FlagValues = flags.FLAGS,
                  sys_argv: list[str] | None = None) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_file`, with a bad override reported by `parse_flags`.

    (ml_collections applies the command line's overrides while defining the
    flag, usually at import; `sys_argv` is that command line, default
    `sys.argv`. The error is kept and raised when the flags are parsed.)
    """
    define = functools.partial(config_flags.DEFINE_config_file, name, default, help_text,
                               lock_config=True, flag_values=flag_values)
    try:
        return define(sys_argv=sys_argv)
    except (KeyError, AttributeError) as e:
        _pending_errors.append(_config_error(name, e))
        return define(sys_argv=(sys_argv or sys.argv)[:1])


_pending_errors: list[RecipeError] = []


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parsing, raising `RecipeError` for a bad flag or config."""
    if _pending_errors:
        raise _pending_errors.pop()
    try:
        return flag_values(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first, last = lines[0], lines[-1]
        raise RecipeError(f"{first if first == last else first + ' ' + last} "
                          "(see --helpshort)") from None
    except (KeyError, AttributeError) as e:  # ml_collections: --config.FIELD not in the config
        raise _config_error("config", e) from None


def strategy_from_flags() -> tf.distribute.Strategy:
    """The strategy that `run` made from `--strategy` (the default one outside `run`)."""
    return _strategy or tf.distribute.get_strategy()


def print_export(export: Callable[[str, list[str]], dict[str, pathlib.Path]], workdir: str,
                 formats: list[str]) -> None:
    """The `export` command: `export(workdir, formats)` (a recipe's `deploy.export`), then a
    line per model written: its format, size and path."""
    if not workdir:
        raise RecipeError("export needs --workdir=WORKDIR (a finished run)")
    for name, path in export(workdir, formats).items():
        print(f"{name}\t{path.stat().st_size / 2**20:.2f} MiB\t{path}")


def _exit_with(message: str) -> None:
    """Prints `error: MESSAGE` and exits with status 2 at once, without the interpreter's
    shutdown: after an error in the middle of training, tearing down TensorFlow's compiled
    functions and h5py's half-written files can crash or print errors of their own.
    """
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def _lost_worker(e: Exception) -> str:
    # TensorFlow's message spans many lines (the graph's stack, the cause, gRPC details):
    # the cause's line ("... aborted by: ...", and the next if the cause starts there) is kept.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if "aborted by" in line), 0)
    cause = " ".join(lines[at:at + 2]) if lines[at].endswith(":") else lines[at]
    return (f"lost a worker of the cluster ({type(e).__name__}: {cause}); restart every "
            "worker with the same command to resume from the last backup")


def _one_line(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)`, with user mistakes reported as one line and exit status 2."""
    try:
        return function(*args)
    except RecipeError as e:
        _exit_with(str(e))
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as e:
        if _STRATEGY.value != "multi_worker":
            raise
        _exit_with(_lost_worker(e))
    except (OSError, RuntimeError, tf.errors.OpError) as e:
        # h5py, TensorFlow and Python raise different types for a full disk, all with these
        # words (h5py names the file as below).
        if "No space left on device" in str(e):
            where = re.search(r"filename = '([^']+)'", str(e))
            _exit_with("no space left on device" + (f" writing {where[1]}" if where else "")
                       + "; free some space or pass a --workdir on another disk, then rerun "
                       "the same command to resume")
        if not isinstance(e, OSError):
            raise
        _exit_with(_text(e).split("; ")[-1])  # the cause (ml_collections first says what it tried)


def run(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)` where user mistakes exit with one line, code 2.

    User mistakes are `RecipeError`s, bad flags, and `OSError`s (a config
    file that is not there, a full disk). A lost worker of a multi-worker
    cluster is reported as one line too.
    """

    def wrapped(argv: list[str]) -> Any:
        console.quiet_logging()
        if _DETERMINISTIC.value:
            tf.config.experimental.enable_op_determinism()
        global _strategy
        _strategy = distribute.make_strategy(_STRATEGY.value, _CPU_DEVICES.value, _TPU.value)
        return main(argv)

    app.run(lambda argv: _one_line(wrapped, argv),
            flags_parser=lambda argv: _one_line(parse_flags, argv))
