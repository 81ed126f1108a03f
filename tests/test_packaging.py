"""The layer library installs and imports alone: TensorFlow and Keras, nothing of the recipes'."""

import importlib.metadata
import subprocess
import sys

from packaging.requirements import Requirement


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
