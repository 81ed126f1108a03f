"""The training path's recurrence as compiled CPU ops (`cpu_kernel.cc`), built on first use.

The source ships with the package and is compiled with the machine's C++
compiler (`$CXX`, default `g++`) against the installed TensorFlow's headers, for
this CPU (`-march=native`), the first time a layer trains. The library is cached
in `$LSTM_TF_CACHE` (default `~/.cache/lstm_tf`) under a name derived from the
source, the TensorFlow build, the compiler and the CPU, written under a
temporary name and renamed into place, so that an interrupted build leaves
nothing half-written and concurrent processes build it once.

Where it cannot be built or loaded (no compiler, no headers, another platform),
`ops()` is None and the layers train on the XLA loops instead: the same results,
more slowly. `LSTM_TF_KERNEL=0` in the environment turns the kernel off.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

import tensorflow as tf

SOURCE = Path(__file__).with_name("cpu_kernel.cc")

_log = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether the layers may use the kernel (`LSTM_TF_KERNEL` is not `0`)."""
    return os.environ.get("LSTM_TF_KERNEL", "1") != "0"


def ops() -> ModuleType | None:
    """The kernel's ops (`lstm_tf_forward`, `lstm_tf_backward`), or None where unavailable."""
    return _load() if enabled() else None


def _compiler_command(output: Path) -> list[str]:
    # (-mno-avx512fp16: Eigen's float16 packet code does not compile with GCC 12,
    # and the kernel is float32 only. -ffast-math and -fopenmp-simd: the element-wise
    # loops are vectorized with the C library's vector exp, 16 lanes wide where the
    # CPU has AVX-512, -mprefer-vector-width=512.)
    return [*shlex.split(os.environ.get("CXX", "g++")), "-O3", "-march=native",
            "-mno-avx512fp16", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp-simd",
            "-shared", "-fPIC",
            "-Wno-deprecated-declarations", "-Wno-interference-size", str(SOURCE),
            *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags(), "-o", str(output)]


def _cpu() -> str:
    """What identifies this CPU's instruction set: its model and flags."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = {line for line in lines if line.startswith(("model name", "flags"))}
        return "\n".join(sorted(wanted))
    return os.uname().machine


def _cache_key() -> str:
    compiler = subprocess.run([*shlex.split(os.environ.get("CXX", "g++")), "--version"],
                              capture_output=True, text=True, check=True).stdout
    parts = [SOURCE.read_text(), tf.__version__, " ".join(_compiler_command(Path("out"))),
             compiler, _cpu()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@functools.cache
def _load() -> ModuleType | None:
    try:
        cache = Path(os.environ.get("LSTM_TF_CACHE") or Path.home() / ".cache" / "lstm_tf")
        cache.mkdir(parents=True, exist_ok=True)
        library = cache / f"cpu_kernel-{_cache_key()}.so"
        with open(cache / f"{library.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others then load it
            if not library.exists():
                _build(library)
        return tf.load_op_library(str(library))
    except (OSError, subprocess.CalledProcessError, tf.errors.OpError) as e:
        _log.info("lstm_tf's CPU kernel is unavailable, training uses the XLA loops: %s",
                  getattr(e, "stderr", None) or e)
        return None


def _build(library: Path) -> None:
    _log.info("Compiling lstm_tf's CPU kernel for this machine (once): %s", library)
    fd, partial = tempfile.mkstemp(dir=library.parent, prefix=f".{library.name}.")
    os.close(fd)
    try:
        subprocess.run(_compiler_command(Path(partial)), check=True, capture_output=True,
                       text=True)
        os.replace(partial, library)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
