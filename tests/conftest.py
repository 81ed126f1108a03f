"""Shared test set-up: quiet TensorFlow, the offline datasets beside the repo, smoke runs.

The smoke runs train in this process, once per session, and are shared by the
test files that need a finished workdir.
"""

import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
if "TFDS_DATA_DIR" not in os.environ and (_SHARED / "tensorflow_datasets").is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED / "tensorflow_datasets")


@pytest.fixture(scope="session")
def sentiment_run(tmp_path_factory) -> pathlib.Path:
    """A finished `configs/sentiment.py:smoke` workdir."""
    from configs import sentiment
    from recipes.sentiment import train

    workdir = tmp_path_factory.mktemp("sentiment_smoke")
    train.train_and_evaluate(sentiment.get_config("smoke"), str(workdir))
    return workdir


@pytest.fixture(scope="session")
def language_model_run(tmp_path_factory) -> pathlib.Path:
    """A finished `configs/language_model.py:smoke` workdir."""
    from configs import language_model
    from recipes.language_model import train

    workdir = tmp_path_factory.mktemp("language_model_smoke")
    train.train_and_evaluate(language_model.get_config("smoke"), str(workdir))
    return workdir


@pytest.fixture(scope="session")
def copy_task_run(tmp_path_factory) -> pathlib.Path:
    """A finished `configs/copy_task.py:smoke` workdir (LSTM)."""
    from configs import copy_task
    from recipes.copy_task import train

    workdir = tmp_path_factory.mktemp("copy_task_smoke")
    train.train_and_evaluate(copy_task.get_config("smoke"), str(workdir))
    return workdir


@pytest.fixture(scope="session")
def sentiment_zh_run(tmp_path_factory) -> pathlib.Path:
    """A finished `configs/sentiment.py:zh_smoke` workdir (Chinese, character tokens)."""
    from configs import sentiment
    from recipes.sentiment import train

    workdir = tmp_path_factory.mktemp("sentiment_zh_smoke")
    train.train_and_evaluate(sentiment.get_config("zh_smoke"), str(workdir))
    return workdir
