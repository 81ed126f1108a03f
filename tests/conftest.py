"""Shared test set-up: quiet TensorFlow, and the offline datasets beside the repo."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
if "TFDS_DATA_DIR" not in os.environ and (_SHARED / "tensorflow_datasets").is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED / "tensorflow_datasets")
