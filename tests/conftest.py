"""Shared test set-up: quiet TensorFlow, the offline datasets beside the repo, smoke runs.

The smoke runs train in this process, once per session, and are shared by the
test files that need a finished workdir.
"""

import importlib
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
if "TFDS_DATA_DIR" not in os.environ and (_SHARED / "tensorflow_datasets").is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED / "tensorflow_datasets")


def _finished_run(tmp_path_factory, recipe: str, variant: str) -> pathlib.Path:
    """A workdir where `python -m recipes.RECIPE --config=configs/RECIPE.py:VARIANT` ran."""
    config = importlib.import_module(f"configs.{recipe}").get_config(variant)
    train = importlib.import_module(f"recipes.{recipe}.train")
    workdir = tmp_path_factory.mktemp(f"{recipe}_{variant}")
    train.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture(scope="session")
def sentiment_run(tmp_path_factory) -> pathlib.Path:
    """A finished `configs/sentiment.py:smoke` workdir."""
    return _finished_run(tmp_path_factory, "sentiment", "smoke")


@pytest.fixture(scope="session")
def language_model_run(tmp_path_factory) -> pathlib.Path:
    """A finished `configs/language_model.py:smoke` workdir."""
    return _finished_run(tmp_path_factory, "language_model", "smoke")


@pytest.fixture(scope="session")
def copy_task_run(tmp_path_factory) -> pathlib.Path:
    """A finished `configs/copy_task.py:smoke` workdir (LSTM)."""
    return _finished_run(tmp_path_factory, "copy_task", "smoke")


@pytest.fixture(scope="session")
def sentiment_zh_run(tmp_path_factory) -> pathlib.Path:
    """A finished `configs/sentiment.py:zh_smoke` workdir (Chinese, character tokens)."""
    return _finished_run(tmp_path_factory, "sentiment", "zh_smoke")
