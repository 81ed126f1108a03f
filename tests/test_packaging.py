"""The layer library installs and imports alone: TensorFlow and Keras, nothing of the recipes';
its wheel holds `lstm_tf` only (the recipes and configs run from the repository)."""

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement
from recipe_testing import ROOT


def test_base_requirements_are_keras_and_tensorflow_only():
    requirements = [Requirement(r) for r in importlib.metadata.requires("lstm_tf")]
    base = {r.name for r in requirements if r.marker is None}
    assert base == {"keras"}, base  # TensorFlow: the `cpu` or `gpu` extra
    tensorflow = {r.name for r in requirements if r.marker is not None
                  and r.marker.evaluate({"extra": "cpu"})}
    assert tensorflow == {"tensorflow-cpu"}


def test_importing_lstm_tf_loads_no_recipe_dependency():
    """(A fresh process: what `import lstm_tf` imports beyond TensorFlow and Keras.)"""
    script = ("import sys, tensorflow, keras; before = set(sys.modules); import lstm_tf; "
              "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - {'lstm_tf'}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_wheel_holds_lstm_tf_alone(tmp_path):
    """(Built from a copy of the repository, so that nothing is written into it.)"""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".*", "runs", "build", "dist", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("lstm_tf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"lstm_tf"}
    assert {n for n in names if n.endswith(".py")} == {
        f"lstm_tf/{p.name}" for p in (ROOT / "lstm_tf").glob("*.py")}
    assert "lstm_tf/cpu_kernel.cc" in names
