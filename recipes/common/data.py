"""TFDS loading with one-line errors: the ordinary `tfds` path, offline or online."""

from __future__ import annotations

import os

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from recipes.common.errors import RecipeError


def data_dir(config_data_dir: str | None) -> str | None:
    """The TFDS data dir: the config field, else `TFDS_DATA_DIR`, else TFDS's default."""
    return config_data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_tfds(name: str, splits: list[str], config_data_dir: str | None,
              download: bool = True) -> list[tf.data.Dataset]:
    """Loads several splits like `tfds.load(..., try_gcs=False)`, with one-line errors.

    The ordinary TFDS path: where the data is not prepared and `download` is
    true, TFDS downloads and prepares it (from the source, not from GCS).
    """
    where = data_dir(config_data_dir)
    try:
        builder = tfds.builder(name, data_dir=where)
    except tfds.core.registered.DatasetNotFoundError:
        raise RecipeError(
            f"unknown TFDS dataset {name!r}: not a TFDS builder, nor prepared in "
            f"{where or 'TFDS_DATA_DIR / the default data dir'}; see `tfds.list_builders()` "
            "for the names, or set TFDS_DATA_DIR or --config.data_dir to where it is prepared"
        ) from None
    shown = where or "TFDS's default data dir"
    if not builder.is_prepared():
        if not download:
            raise RecipeError(
                f"dataset {name!r} is not prepared in {shown}; set TFDS_DATA_DIR or "
                "--config.data_dir to a directory that holds it (or allow the download)"
            )
        logging.info("%s is not in %s: downloading it with TFDS", name, shown)
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        except Exception as e:  # network errors come in many types
            raise RecipeError(
                f"dataset {name!r} is not in {shown} and downloading it failed "
                f"({_first_line(e)}); set TFDS_DATA_DIR or --config.data_dir to a "
                "directory with the prepared data"
            ) from None
    datasets = []
    for split in splits:
        try:
            datasets.append(builder.as_dataset(split=split, shuffle_files=False))
        except (ValueError, KeyError, AssertionError) as e:
            raise RecipeError(f"bad split {split!r} for {name!r}: {_first_line(e)}") from None
    return datasets
