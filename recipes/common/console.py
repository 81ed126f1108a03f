"""A quiet console: the recipes print Keras's output, their own lines and real warnings.

By default TensorFlow's C++ logging shows only fatal errors (`TF_CPP_MIN_LOG_LEVEL=3`,
unless it is set in the environment: `TF_CPP_MIN_LOG_LEVEL=0` shows all of it) and absl's
logging (TFDS's messages, the recipes' own details) shows warnings and errors only
(`--verbosity=0` shows its INFO messages too).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from absl import flags
from absl import logging as absl_logging

# What TensorFlow's C++ code logs while it loads, whatever TF_CPP_MIN_LOG_LEVEL says:
# INFO lines, and absl's notice that logging is not initialized yet.
_LOADING_NOISE = re.compile(r"I\d{4} |WARNING: All log messages before absl::InitializeLog\(\)")


def import_tensorflow_quietly() -> None:
    """`import tensorflow` with its C++ logging at fatal errors only, unless the environment
    sets TF_CPP_MIN_LOG_LEVEL (then as it says).

    What TensorFlow logs while it loads ignores the level: all of it but the INFO lines (and
    absl's notice) reaches stderr (`native_stderr_without`).
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401

        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with native_stderr_without(_LOADING_NOISE):
        import tensorflow  # noqa: F401


@contextlib.contextmanager
def native_stderr_without(noise: re.Pattern) -> Iterator[None]:
    """Inside, what is written to file descriptor 2 (native code's stderr too) is held back;
    afterwards it goes to `sys.stderr` without the lines that start with a match of `noise`.

    (For C++ output that no option or log level silences.)
    """
    sys.stderr.flush()
    stderr = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(stderr, 2)
            os.close(stderr)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not noise.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def quiet_logging(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """absl's logging at WARNING, unless `--verbosity` (`-v`) is on the command line.

    (`absl.app.run` sets INFO when the flag is not given.)
    """
    if not flag_values["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
