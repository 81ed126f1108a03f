"""Deployment of a finished run: the LSTM copy model as TFLite and ONNX, and predictions.

`export(workdir, formats)` writes `WORKDIR/deploy/`: TFLite (batch 1, any
length: `inputs` int32 `[1, T + 20]`) and ONNX (any batch and length), each
returning `predictions` int32 (the most likely token per step), as the
SavedModel's `serving_default`. Only the LSTM (`--config.cell=lstm`) has the
converters' LSTM ops; Keras's SimpleRNN and GRU are loops there.
"""

from __future__ import annotations

import pathlib
from typing import Any

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from recipes.common import checkpoints, deploy, exports, workdirs
from recipes.common.errors import RecipeError
from recipes.copy_task import model as models


def finished_run(workdir: str) -> tuple[pathlib.Path, Any]:
    """A workdir with a trained LSTM copy model, and its config."""
    path = deploy.finished_workdir(workdir, "copy-task model")
    config = ml_collections.ConfigDict(workdirs.read_json(path / "config.json"))
    if config.cell != "lstm":
        raise RecipeError(f"export is for the LSTM (this run's cell is {config.cell!r}: "
                          "Keras's SimpleRNN and GRU, and the LSTM variants, have no fused op "
                          "to convert to)")
    return path, config


def predictions_model(config: Any, path: pathlib.Path, batch_size: int | None = None
                      ) -> keras.Model:
    """The trained model with its logits turned into `predictions` (argmax per step)."""
    model = models.create_model(config, batch_size=batch_size)
    model.load_weights(checkpoints.best_checkpoint(path))
    # (tf.argmax: keras.ops.argmax adds a BitwiseAnd, which TFLite has no kernel for.)
    predictions = keras.layers.Lambda(
        lambda logits: tf.argmax(logits, axis=-1, output_type=tf.int32),
        name="predictions")(model.outputs[0])
    return keras.Model(model.inputs, predictions)


def export(workdir: str, formats: list[str]) -> dict[str, pathlib.Path]:
    """Writes the `formats` of `workdir`'s model into `workdir/deploy/`; returns their paths."""
    formats = deploy.check_formats(formats)
    path, config = finished_run(workdir)
    return deploy.export(
        path, formats,
        to_onnx=lambda: deploy.onnx(deploy.named_outputs(predictions_model(config, path)), [
            tf.TensorSpec([None, None], tf.int32, name="inputs")]),
        to_tflite=lambda quantization: deploy.tflite(
            predictions_model(config, path, batch_size=1), quantization,
            lambda: _calibration(config)))


def _calibration(config: Any) -> Any:
    from recipes.copy_task import input_pipeline

    inputs, _ = input_pipeline.held_out(config)
    for row in inputs[:100]:
        yield {"inputs": row[None].astype(np.int32)}


def predict(model_path: str, inputs: np.ndarray) -> np.ndarray:
    """`predictions` int32 `[batch, time]` of a SavedModel export or a deployed file."""
    if pathlib.Path(model_path).expanduser().is_dir():
        serve = tf.saved_model.load(str(exports.latest_export(model_path))).signatures[
            "serving_default"]
        return serve(inputs=tf.constant(inputs, tf.int32))["predictions"].numpy()
    model = deploy.Model(model_path)
    if model.format == "onnx":
        return model(inputs=inputs.astype(np.int32))["predictions"]
    return np.concatenate([model(inputs=row[None].astype(np.int32))["predictions"]
                           for row in inputs])


def config_of(model_path: str, config: Any) -> Any:
    """The config of the model's run (`config` updated from its `config.json`), or
    `config` itself for a model outside a run's workdir."""
    found = deploy.run_config_file(model_path)
    if not found:
        return config
    config = config.copy_and_resolve_references()
    config.update(workdirs.read_json(found))
    return config


def show_predictions(model_path: str, config: Any, rows: int = 3) -> list[str]:
    """Held-out sequences laid out as the model's run did (`config_of`): their symbols and
    the model's copies."""
    from recipes.copy_task import input_pipeline

    config = config_of(model_path, config)
    inputs, targets = input_pipeline.held_out(config)
    predictions = predict(model_path, inputs[:rows])
    n = config.copy_length
    return [f"symbols {' '.join(map(str, x[:n]))}\tcopied {' '.join(map(str, p[-n:]))}\t"
            f"{'correct' if np.array_equal(p[-n:], t[-n:]) else 'wrong'}"
            for x, p, t in zip(inputs[:rows], predictions, targets[:rows], strict=True)]
