"""Versioned exports under `WORKDIR/export/<N>`, written atomically, as TF Serving expects."""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
from collections.abc import Callable

from recipes.common.errors import RecipeError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(root: pathlib.Path, name: str = "") -> None:
    """Removes the `.tmp-NAME-*PID` entries of `root` (all `.tmp-*` without `name`) whose
    process is gone: what a killed `write_atomically` of `root/NAME` left."""
    for stale in root.glob(f".tmp-{glob.escape(name)}*" if name else ".tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def write_atomically(write: Callable[[str], None], final: pathlib.Path) -> pathlib.Path:
    """`write(tmp)` to a hidden temporary path beside `final`, then renamed to `final`.

    A run killed mid-write leaves no half-written `final` behind (and the next
    call removes its leftover); an existing `final` is replaced only when the
    new one is complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        write(str(tmp))
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    if final.is_dir():
        old = final.with_name(f".tmp-{final.name}-old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def export_saved_model(write: Callable[[str], None], workdir: pathlib.Path) -> pathlib.Path:
    """Writes a new `workdir/export/<version>` atomically, as TF Serving expects.

    `write(path)` writes a SavedModel to `path`; see `write_atomically`.
    """
    root = workdir / "export"
    root.mkdir(exist_ok=True)
    remove_stale_temporaries(root)  # every killed export's (the directory is ours)
    versions = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    return write_atomically(write, root / str(max(versions, default=0) + 1))


def latest_export(export_dir: str) -> pathlib.Path:
    """`export_dir` itself if it is a SavedModel, else its highest version."""
    path = pathlib.Path(export_dir).expanduser()
    if (path / "saved_model.pb").exists():
        return path
    versions = sorted((int(p.name), p) for p in path.glob("*") if p.name.isdigit()
                      and (p / "saved_model.pb").exists()) if path.is_dir() else []
    if not versions:
        raise RecipeError(
            f"no SavedModel in {path}; pass a run's WORKDIR/export (or a version in it)"
        )
    return versions[-1][1]
