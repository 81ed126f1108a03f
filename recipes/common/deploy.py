"""Deployment formats of a trained model: TFLite (float, dynamic-range, int8) and ONNX.

Every recipe writes them with `export(...)` into `WORKDIR/deploy/` from a Keras
model that takes token ids (tokenization stays outside: TFLite's built-in ops
and ONNX have no string ops), and runs any of them with `load(path)`, which
needs only LiteRT (`ai-edge-litert`) or onnxruntime at run time.

| format | file | what it is |
| --- | --- | --- |
| `tflite` | `model.tflite` | float32, LiteRT built-in ops only |
| `tflite_dynamic` | `model_dynamic.tflite` | weights int8, activations float (dynamic range) |
| `tflite_int8` | `model_int8.tflite` | full integer quantization from a representative dataset |
| `onnx` | `model.onnx` | tf2onnx, dynamic batch and length |
"""

from __future__ import annotations

import importlib
import pathlib
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lstm_tf import conversion
from recipes.common import checkpoints, console, exports, workdirs
from recipes.common.errors import RecipeError

FILES = {"tflite": "model.tflite", "tflite_dynamic": "model_dynamic.tflite",
         "tflite_int8": "model_int8.tflite", "onnx": "model.onnx"}
FORMATS = tuple(FILES)
ONNX_OPSET = 17
# Ops a TFLite model must not contain: a loop instead of the fused LSTM op, or TF ops.
UNWANTED_TFLITE_OPS = ("WHILE", "IF", "CALL_ONCE", "FLEX", "CUSTOM")


def optional(module: str) -> Any:
    """`import module` (LiteRT, onnxruntime, tf2onnx), or `RecipeError` saying how to get it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise RecipeError(f"{e.name} is not installed: deployed models need the deploy extra "
                          "(pip install -e '.[deploy]')") from None


def finished_workdir(workdir: str, what: str, *files: str) -> pathlib.Path:
    """`workdir`, resolved, if it holds a finished run (`config.json`, `files`, the best
    checkpoint); else `RecipeError` naming what is missing (`what`: the recipe's model)."""
    path = pathlib.Path(workdir).expanduser().resolve()
    needed = [path / "config.json", *(path / f for f in files), checkpoints.best_checkpoint(path)]
    missing = [p for p in needed if not p.exists()]
    if missing:
        raise RecipeError(f"{path} holds no trained {what} ({missing[0].name} is missing); "
                          "pass the --workdir of a finished training run")
    return path


def run_config_file(model_path: str) -> pathlib.Path | None:
    """The `config.json` of the run a model belongs to (in a directory above it), if any."""
    path = pathlib.Path(model_path).expanduser().resolve()
    for parent in list(path.parents)[:3]:
        if (parent / "config.json").is_file():
            return parent / "config.json"
    return None


def check_formats(formats: Iterable[str]) -> list[str]:
    """The formats asked for, or `RecipeError` naming an unknown one."""
    formats = list(formats)
    unknown = [f for f in formats if f not in FILES]
    if unknown or not formats:
        raise RecipeError(f"unknown format {unknown[0] if unknown else ''!r} in --format "
                          f"(known: {', '.join(FORMATS)})")
    return formats


# What TFLite's calibrating quantizer prints to the C++ stderr (no option or log level
# silences it).
_QUANTIZER_SETTINGS = re.compile(r"fully_quantize: \d+, inference_type: ")


def tflite(model: keras.Model, quantization: str = "",
           representative: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
           output_names: list[str] | None = None) -> bytes:
    """`model` (fixed batch size) converted by the stock `TFLiteConverter.from_saved_model`.

    `quantization`: "" (float32), "dynamic" (int8 weights) or "int8" (full
    integer quantization of weights and activations, calibrated on the inputs
    `representative()` yields, `{input name: array}`; float inputs and outputs
    stay float).
    """
    with tempfile.TemporaryDirectory() as saved, warnings.catch_warnings():
        # (TensorFlow's int8 calibration runs the deprecated tf.lite.Interpreter.)
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", named_outputs(model, output_names), input_signature=[
            tf.TensorSpec(i.shape, i.dtype, name=i.name) for i in model.inputs])
        archive.write_out(saved, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        if quantization:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization != "int8":
            return converter.convert()
        converter.representative_dataset = representative
        with console.native_stderr_without(_QUANTIZER_SETTINGS):
            return converter.convert()


def named_outputs(model: keras.Model, names: list[str] | None = None
                  ) -> Callable[..., dict[str, tf.Tensor]]:
    """`model`'s inference as a function of its inputs (in order) to `{output name: tensor}`.

    `names`: the outputs' names (default: `model.output_names`).
    """
    def call(*inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        return dict(zip(names or model.output_names, tf.nest.flatten(outputs), strict=True))

    return call


def tflite_ops(content: bytes) -> set[str]:
    """The names of the ops in a TFLite model."""
    interpreter = optional("ai_edge_litert.interpreter")
    # (`_get_ops_details` is LiteRT's only way to list ops from Python; TF's
    # `Analyzer` prints them from C++.)
    return {op["op_name"] for op in
            interpreter.Interpreter(model_content=content)._get_ops_details()}


def unwanted_ops(content: bytes) -> list[str]:
    """The loop, Flex and custom ops of a TFLite model (none in a fused, built-in model)."""
    return sorted(op for op in tflite_ops(content)
                  if any(op.startswith(bad) for bad in UNWANTED_TFLITE_OPS))


def check_builtin(name: str, content: bytes) -> bytes:
    """`content`, a TFLite model, or `RecipeError` if it holds a loop, Flex or custom op."""
    unwanted = unwanted_ops(content)
    if unwanted:
        raise RecipeError(f"--format={name}: the converted model holds {', '.join(unwanted)} "
                          "(not the fused LSTM op); a layer of the model cannot be fused "
                          "(see the conversion's warning)")
    return content


def onnx(function: Callable[..., Any], input_signature: list[tf.TensorSpec]) -> bytes:
    """`function` of tensors as a serialized ONNX model (tf2onnx, ONNX LSTM ops)."""
    optional("tf2onnx")
    return conversion.to_onnx(function, input_signature, opset=ONNX_OPSET).SerializeToString()


def export(path: pathlib.Path, formats: list[str], to_onnx: Callable[[], bytes],
           to_tflite: Callable[[str], bytes],
           files: Callable[[], dict[str, bytes]] | None = None) -> dict[str, pathlib.Path]:
    """Writes the `formats` of the run in `path` into `path/deploy/`, then the files the
    models need beside them; returns the models' paths.

    `path`: a finished run (`finished_workdir`), locked meanwhile; `formats`: checked
    (`check_formats`). The recipe converts its model: `to_onnx()` to ONNX (with `onnx`),
    `to_tflite(quantization)` to TFLite (with `tflite`: quantization "", "dynamic" or
    "int8"), which must hold built-in ops only (`check_builtin`). `files()`: `{name: content}` to
    ship beside the models (the vocabulary, the tokenizer's settings).
    """
    with workdirs.locked(path):
        out = path / "deploy"
        out.mkdir(exist_ok=True)
        written = {}
        for name in formats:
            if name == "onnx":
                content = to_onnx()
            else:
                quantization = name.removeprefix("tflite").removeprefix("_")
                content = check_builtin(name, to_tflite(quantization))
            written[name] = write(content, out / FILES[name])
        for name, content in (files() if files else {}).items():
            write(content, out / name)
    return written


def write(content: bytes, path: pathlib.Path) -> pathlib.Path:
    """Writes a model file atomically (the old one stays until the new one is complete)."""
    return exports.write_atomically(lambda tmp: pathlib.Path(tmp).write_bytes(content), path)


class Model:
    """A deployed model file (`.tflite` or `.onnx`) as a function of named numpy arrays.

    `model(**inputs)` returns `{output name: array}`; TFLite inputs are resized
    to the arrays given (LiteRT's signature runner). Calls are independent:
    `lstm_tf` models carry no state from one call to the next.
    """

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise RecipeError(f"no model file {self.path}; write it with the recipe's "
                              "`export --workdir=WORKDIR` command")
        self.format = "onnx" if self.path.suffix == ".onnx" else "tflite"
        runtime = optional("onnxruntime" if self.format == "onnx" else "ai_edge_litert.interpreter")
        try:
            if self.format == "onnx":
                self._session = runtime.InferenceSession(
                    str(self.path), providers=["CPUExecutionProvider"])
                self.input_names = [i.name for i in self._session.get_inputs()]
            else:
                self._interpreter = runtime.Interpreter(model_path=str(self.path))
                self._runner = self._interpreter.get_signature_runner()
                self.input_names = sorted(self._runner.get_input_details())
        except (ValueError, RuntimeError) as e:
            raise RecipeError(f"{self.path} is not a readable {self.format} model "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else e})"
                              ) from None
        except Exception as e:  # onnxruntime's errors have their own types
            if type(e).__module__.startswith("onnxruntime"):
                raise RecipeError(f"{self.path} is not a readable onnx model "
                                  f"({str(e).strip().splitlines()[0]})") from None
            raise

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        if self.format == "onnx":
            names = [o.name for o in self._session.get_outputs()]
            return dict(zip(names, self._session.run(names, inputs), strict=True))
        return self._runner(**inputs)
