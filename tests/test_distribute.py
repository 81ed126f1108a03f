"""--strategy: two worker processes (MultiWorkerMirroredStrategy), mirrored over two CPUs.

Both are compared with one process training on the same global batches. Dropout is
off, gradients are not clipped (Keras clips each replica's gradient before they are
summed) and only full batches are used (replicas average their mean losses), so the
runs differ only by the order of floating-point sums.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from recipe_testing import ROOT, assert_one_line_error, run_recipe, wait_until

from recipes.common.errors import RecipeError

COMPARABLE = ["--config=configs/sentiment.py:smoke", "--config.epochs=3", "--deterministic",
              "--config.dropout=0", "--config.word_dropout=0", "--config.learning_rate=0.01",
              "--config.clipnorm=1e6", "--config.drop_remainder=True"]
TOLERANCE = 0.01  # on losses: above rounding differences, below what training moves them


def _metrics(workdir: pathlib.Path) -> dict:
    return json.loads((workdir / "metrics.json").read_text())


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(workdir: pathlib.Path, *args: str) -> list[subprocess.Popen]:
    """Two `--strategy=multi_worker` processes on 127.0.0.1, cluster in TF_CONFIG."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    procs = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "recipes.sentiment", f"--workdir={workdir}",
             "--strategy=multi_worker", *args], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "TF_CONFIG": json.dumps(tf_config)}))
    return procs


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single")
    run_recipe("sentiment", f"--workdir={workdir}", *COMPARABLE)
    return _metrics(workdir)


def _assert_same_training(metrics: dict, reference: dict) -> None:
    assert reference["train"]["loss"] < 0.6  # it learnt something: the comparison has teeth
    for split in ("train", "validation", "test"):
        assert metrics[split]["loss"] == pytest.approx(reference[split]["loss"], abs=TOLERANCE)


@pytest.mark.slow
def test_two_workers_train_like_one_process_even_when_one_is_killed(tmp_path,
                                                                   single_process):
    """Worker 1 is killed (-9) once epoch 1 is backed up: the chief stops with one line,
    not a hang; the same command resumes the cluster at epoch 2 and ends where one
    process ends."""
    procs = _start_workers(tmp_path, *COMPARABLE)
    backup = tmp_path / "backup" / "state" / "training_metadata.json"
    assert wait_until(backup.exists, procs[0]), procs[0].communicate()[1][-3000:]
    procs[1].send_signal(signal.SIGKILL)
    _, stderr = procs[0].communicate(timeout=120)
    procs[1].wait()
    assert_one_line_error(subprocess.CompletedProcess([], procs[0].returncode, "", stderr),
                          "lost a worker of the cluster")
    assert not (tmp_path / "metrics.json").exists()

    procs = _start_workers(tmp_path, *COMPARABLE)
    outputs = [p.communicate(timeout=1800) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
        first_epoch = next(line for line in stdout.splitlines() if line.startswith("Epoch "))
        assert first_epoch == "Epoch 2/3", first_epoch  # resumed, not restarted
    metrics = _metrics(tmp_path)
    _assert_same_training(metrics, single_process)
    # The chief (worker 0) writes the results; worker 1 only its scratch directory.
    assert metrics["export"] == str(tmp_path / "export" / "1")
    assert (tmp_path / "export" / "1" / "saved_model.pb").exists()
    worker = tmp_path / "workers" / "worker-1"
    assert (worker / "checkpoints" / "best.weights.h5").exists()
    assert not (worker / "export").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0] != ".") == [
        "checkpoints", "config.json", "export", "metrics.json", "tensorboard", "vocab.txt",
        "workers"]


@pytest.mark.slow
def test_mirrored_over_two_cpus_trains_like_one_device(tmp_path, single_process):
    proc = run_recipe("sentiment", f"--workdir={tmp_path}", *COMPARABLE,
                      "--strategy=mirrored", "--cpu_devices=2", "--verbosity=0")
    assert "MirroredStrategy with devices" in proc.stderr and "device:CPU:1" in proc.stderr
    _assert_same_training(_metrics(tmp_path), single_process)


def test_bad_strategy_flags(monkeypatch):
    from absl import flags

    from recipes.common import cli, distribute

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(RecipeError, match="needs the cluster in TF_CONFIG"):
        distribute.make_strategy("multi_worker")
    with pytest.raises(RecipeError, match="--cpu_devices=-1 is invalid"):
        distribute.make_strategy("default", cpu_devices=-1)
    try:
        with pytest.raises(RecipeError, match="flag --strategy=nccl"):
            cli.parse_flags(["recipe", "--strategy=nccl"])
    finally:
        flags.FLAGS.unparse_flags()


def test_language_model_needs_one_replica(tmp_path):
    proc = run_recipe("language_model", f"--workdir={tmp_path / 'run'}",
                      "--config=configs/language_model.py:smoke", "--strategy=mirrored",
                      "--cpu_devices=2", check=False)
    assert_one_line_error(proc, "needs one replica (this strategy has 2)")
    assert not (tmp_path / "run").exists()
