"""Surviving faults: kill -9 and resume, damaged backups, a busy workdir, NaN loss,
interrupted export, full disk."""

import fcntl
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from recipe_testing import ROOT, assert_one_line_error, run_recipe, wait_until

from recipes.common import checkpoints, exports, workdirs
from recipes.common.errors import RecipeError

# Dropout on, and the adversarial losses: resuming must also restore the dropout layers'
# random state, and the virtual adversarial random starts (seeded by the step) must go on.
SENTIMENT = ["--config=configs/sentiment.py:smoke", "--deterministic",
             "--config.normalize_embeddings=True", "--config.adversarial_epsilon=1",
             "--config.virtual_adversarial_epsilon=1"]


def _results(workdir: pathlib.Path) -> dict:
    metrics = json.loads((workdir / "metrics.json").read_text())
    return {split: metrics[split] for split in ("train", "validation", "test")}


@pytest.mark.slow
def test_killed_run_resumes_and_ends_as_if_never_killed(tmp_path):
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"

    def start(workdir: pathlib.Path) -> subprocess.Popen:
        with open(tmp_path / f"{workdir.name}.log", "w") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "recipes.sentiment", f"--workdir={workdir}",
                 *SENTIMENT], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)

    reference = start(uninterrupted)  # (alongside: one core each)
    proc = start(killed)
    metadata = killed / "backup" / "state" / "training_metadata.json"
    wait_until(metadata.exists, proc)  # epoch 1 is backed up: the run is past it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reference.wait() == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    assert json.loads(metadata.read_text())["epoch"] == 1, "not killed during epoch 2"
    assert not (killed / "metrics.json").exists()
    _assert_damaged_backups_are_named(killed, tmp_path)

    resumed = run_recipe("sentiment", f"--workdir={killed}", *SENTIMENT)
    first_epoch = next(line for line in resumed.stdout.splitlines() if line.startswith("Epoch "))
    assert first_epoch == "Epoch 2/2"  # from the backup, not from scratch
    assert _results(killed) == _results(uninterrupted)  # bitwise: same data order, dropout


def _assert_damaged_backups_are_named(killed: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A truncated backup stops the rerun with one line naming it and the remedy."""
    from configs import sentiment
    from recipes.sentiment import train

    for name in ("training_metadata.json", "latest.weights.h5"):
        damaged = tmp_path / f"damaged_{name}"
        shutil.copytree(killed, damaged)
        target = damaged / "backup" / "state" / name
        target.write_bytes(target.read_bytes()[:len(target.read_bytes()) // 2])
        with pytest.raises(RecipeError, match=(
                f"the backup in {damaged / 'backup' / 'state'} is damaged .*; delete "
                f"{damaged / 'backup'} and rerun")):
            train.train_and_evaluate(sentiment.get_config("smoke"), str(damaged))


@pytest.mark.slow
def test_a_workdir_in_use_is_refused(tmp_path):
    from configs import sentiment
    from recipes.sentiment import train

    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys; from recipes.common import workdirs; "
         "workdirs.lock_workdir(pathlib.Path(sys.argv[1])); print('locked', flush=True); "
         "sys.stdin.read()", str(tmp_path)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RecipeError, match=f"{tmp_path} is in use by process {holder.pid}"):
            train.train_and_evaluate(sentiment.get_config("smoke"), str(tmp_path))
    finally:
        holder.communicate("")
    assert not (tmp_path / "metrics.json").exists()


def test_a_lock_taken_a_moment_ago_names_its_holder(tmp_path):
    """(The holder writes its pid just after taking the lock: the refusal waits for it.)"""
    with open(tmp_path / ".lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        threading.Timer(0.2, lambda: (holder.write("12345"), holder.flush())).start()
        with pytest.raises(RecipeError, match=f"{tmp_path} is in use by process 12345; wait"):
            workdirs.lock_workdir(tmp_path)


COPY_SMOKE = ["--config=configs/copy_task.py:smoke"]


def _copy_smoke(**overrides):
    from configs import copy_task

    config = copy_task.get_config("smoke")
    config.update(overrides)
    return config


@pytest.fixture
def finished_copy_run(tmp_path):
    """A workdir with a completed copy-task smoke run: best checkpoint and export 1."""
    from recipes.copy_task import train

    train.train_and_evaluate(_copy_smoke(), str(tmp_path))
    return tmp_path


def _assert_export_1_serves(workdir: pathlib.Path) -> None:
    assert sorted(p.name for p in (workdir / "export").iterdir() if p.name[0] != ".") == ["1"]
    assert exports.latest_export(str(workdir / "export")).name == "1"
    loaded = tf.saved_model.load(str(workdir / "export" / "1"))
    predictions = loaded.signatures["serving_default"](inputs=tf.zeros([1, 30], tf.int32))
    assert predictions["predictions"].shape == (1, 30)


def test_nan_loss_stops_with_one_line_and_keeps_checkpoint_and_export(finished_copy_run):
    workdir = finished_copy_run
    from recipes.copy_task import train

    best = (workdir / "checkpoints" / "best.weights.h5").read_bytes()
    (workdir / "metrics.json").unlink()  # train it again (a finished run stays finished)
    with pytest.raises(RecipeError, match=r"training loss became .* at step \d+ \(epoch 1, "
                                          r"batch \d+\); stopped"):
        train.train_and_evaluate(_copy_smoke(learning_rate=1e35, clipnorm=1e30), str(workdir))
    assert (workdir / "checkpoints" / "best.weights.h5").read_bytes() == best
    _assert_export_1_serves(workdir)


@pytest.mark.slow
def test_run_killed_while_exporting_leaves_the_previous_version_servable(finished_copy_run):
    workdir = finished_copy_run
    (workdir / "metrics.json").unlink()  # train it again (a finished run stays finished)
    proc = subprocess.Popen(
        [sys.executable, "-m", "recipes.copy_task", f"--workdir={workdir}", *COPY_SMOKE],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: any((workdir / "export").glob(".tmp-*")), proc, interval=0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it exported"
    assert list((workdir / "export").glob(".tmp-*"))  # killed mid-export
    _assert_export_1_serves(workdir)


def _write_model(path: str) -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.export(path, verbose=False)


def test_interrupted_export_leaves_the_previous_version_servable(tmp_path):
    first = exports.export_saved_model(_write_model, tmp_path)

    def dies_halfway(path: str) -> None:
        _write_model(path)  # a complete SavedModel in the temporary directory ...
        (pathlib.Path(path) / "variables").rename(pathlib.Path(path) / "half")
        raise KeyboardInterrupt  # ... then the process is interrupted

    with pytest.raises(KeyboardInterrupt):
        exports.export_saved_model(dies_halfway, tmp_path)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["1"]
    assert exports.latest_export(str(tmp_path / "export")) == first
    loaded = tf.saved_model.load(str(first))
    assert loaded.serve(np.ones((1, 3), np.float32)).shape == (1, 2)

    # A kill -9 cannot clean up: its temporary directory is hidden, never served,
    # and removed by the next export.
    shutil.copytree(first, tmp_path / "export" / f".tmp-2-{2**22 + 1}")  # no such process
    assert exports.latest_export(str(tmp_path / "export")) == first
    assert exports.export_saved_model(_write_model, tmp_path).name == "2"
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["1", "2"]


def test_backup_interrupted_while_swapping_is_recovered(tmp_path):
    """A kill between the two renames of a backup leaves only `state.old`: it is used.

    Every worker reads it; only the chief (`recover=True`) renames it back.
    """
    (tmp_path / "state.old").mkdir()
    (tmp_path / "state.old" / "training_metadata.json").write_text('{"epoch": 3}')
    assert checkpoints.completed_epochs(tmp_path) == 3
    assert checkpoints.restorable_state(tmp_path) == tmp_path / "state.old"
    assert not (tmp_path / "state").exists()  # reading renames nothing
    assert checkpoints.restorable_state(tmp_path, recover=True) == tmp_path / "state"
    assert (tmp_path / "state").exists() and not (tmp_path / "state.old").exists()
    assert checkpoints.completed_epochs(tmp_path) == 3
    assert checkpoints.completed_epochs(tmp_path / "nothing") == 0


def test_fit_interrupted_and_resumed_from_its_backup_ends_as_if_never_interrupted(tmp_path):
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == 2:
                raise KeyboardInterrupt

    def model() -> keras.Model:
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile("adam", "mse")
        return model

    x, y = np.random.default_rng(0).random((64, 4)), np.random.default_rng(1).random((64, 1))
    with pytest.raises(KeyboardInterrupt):
        model().fit(x, y, epochs=4, shuffle=False, verbose=0,
                    callbacks=[checkpoints.Backup(tmp_path), Interrupt()])
    assert checkpoints.completed_epochs(tmp_path) == 2
    with pytest.raises(RuntimeError, match="fit starts at epoch 0, its backup .* at 2"):
        model().fit(x, y, epochs=4, verbose=0, callbacks=[checkpoints.Backup(tmp_path)])

    resumed, uninterrupted = model(), model()
    resumed.fit(x, y, epochs=4, initial_epoch=2, shuffle=False, verbose=0,
                callbacks=[checkpoints.Backup(tmp_path)])
    uninterrupted.fit(x, y, epochs=4, shuffle=False, verbose=0)
    assert int(resumed.optimizer.iterations) == int(uninterrupted.optimizer.iterations) == 8
    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not tmp_path.exists()  # deleted when training ends


@pytest.mark.slow
def test_full_disk_gives_one_line_error(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    workdir = disk / "run"
    script = (f"mount -t tmpfs -o size=300k tmpfs {disk} && exec {sys.executable} -m "
              f"recipes.sentiment --workdir={workdir} --config=configs/sentiment.py:smoke")
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) for a small tmpfs")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT,
                          capture_output=True, text=True)
    assert_one_line_error(proc, "no space left on device writing ")
