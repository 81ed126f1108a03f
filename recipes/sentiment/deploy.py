"""Deployment artifacts of a run, ensembles of exports, predictions and accuracy with any.

`export(workdir, formats)` writes `WORKDIR/deploy/`: the token-id models
(`recipes.common.deploy`: TFLite float / dynamic-range / int8, ONNX), with
`vocab.txt` and `tokenizer.json` beside them (`tokenizer.Tokenizer` reads
them: the export's tokenization in plain Python). Padding never changes a
review's result: the TFLite models take one review at its true length (batch
1, no padding, so no mask: what TFLite's fused LSTM op needs); the ONNX model
takes right-padded batches of any size (0 = padding), its LSTMs skipping the
padding (`sequence_lens`).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from configs import sentiment as sentiment_config
from recipes.common import checkpoints, deploy, exports, workdirs
from recipes.common.errors import RecipeError
from recipes.sentiment import input_pipeline
from recipes.sentiment import model as models
from recipes.sentiment.tokenizer import Tokenizer


def finished_run(workdir: str) -> tuple[pathlib.Path, Any]:
    """A workdir with a trained model (best checkpoint), and its config."""
    path = deploy.finished_workdir(workdir, "sentiment model", "vocab.txt")
    return path, run_config(path / "config.json")


def run_config(path: pathlib.Path) -> Any:
    """A run's resolved config (`config.json`); fields newer than the run get their defaults."""
    config = sentiment_config.get_config()
    config.update(workdirs.read_json(path))
    return config


def token_model(config: Any, workdir: pathlib.Path, batch_size: int | None = None,
                masked: bool = True) -> keras.Model:
    """The trained model on token ids (best checkpoint); `masked=False`: no padding mask."""
    model = models.create_model(config, batch_size=batch_size, mask_zero=masked)
    model.load_weights(checkpoints.best_checkpoint(workdir))
    return model


def export(workdir: str, formats: list[str]) -> dict[str, pathlib.Path]:
    """Writes the `formats` of `workdir`'s model into `workdir/deploy/`; returns their paths."""
    formats = deploy.check_formats(formats)
    path, config = finished_run(workdir)

    def to_onnx() -> bytes:
        return deploy.onnx(deploy.named_outputs(token_model(config, path)), [
            tf.TensorSpec([None, None], tf.int64, name="tokens")])

    def to_tflite(quantization: str) -> bytes:
        tokenizer = Tokenizer.from_run(path, config)
        return deploy.tflite(token_model(config, path, batch_size=1, masked=False),
                             quantization, lambda: _representative(config, tokenizer))

    def files() -> dict[str, bytes]:
        empty = float(token_model(config, path)(np.zeros((1, 1), np.int64))[0, 0])
        settings = {"max_length": config.max_length, "split": config.split,
                    "ngrams": config.ngrams, "empty_probability": empty}
        return {"vocab.txt": (path / "vocab.txt").read_bytes(),
                "tokenizer.json": json.dumps(settings, indent=2).encode()}

    return deploy.export(path, formats, to_onnx, to_tflite, files)


def ensemble(models: list[str], workdir: str) -> pathlib.Path:
    """A SavedModel averaging the P(positive) of sentiment exports (ULMFiT's ensemble).

    Its `serving_default` takes `text` `[batch]` like every member's (each
    member tokenizes for itself) and returns the mean probability and its label.
    Written to `workdir/export/<N>`, with `members.json` (the members' exports)
    and the first member's `config.json` (its dataset and splits, for `evaluate`).
    """
    if len(models) < 2:
        raise RecipeError("ensemble needs two or more exports: "
                          "--models=WORKDIR/export,WORKDIR/export[,...]")
    out = pathlib.Path(workdir).expanduser().resolve()
    if (out / "config.json").exists() and not (out / "members.json").exists():
        raise RecipeError(f"{out} holds a training run; pass a new --workdir for the ensemble")
    paths = [exports.latest_export(m) for m in models]
    configs = [config_of(m) for m in models]
    datasets = sorted({c.dataset for c in configs})
    if len(datasets) > 1:
        raise RecipeError(f"the exports were trained on different datasets "
                          f"({', '.join(datasets)}); an ensemble averages models of one")
    members = [tf.saved_model.load(str(p)) for p in paths]
    for path, member in zip(paths, members, strict=True):
        serving = member.signatures.get("serving_default")
        if serving is None or "probability" not in serving.structured_outputs:
            raise RecipeError(f"{path} is not a sentiment export (no serving_default "
                              "giving a probability)")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(text: tf.Tensor) -> dict[str, tf.Tensor]:
        probability = tf.add_n([m.signatures["serving_default"](text=text)["probability"]
                                for m in members]) / len(members)
        return {"probability": probability, "label": tf.cast(probability >= 0.5, tf.int32)}

    module = tf.Module()
    module.members = members
    # Serving needs no gradients, and the fused LSTM's custom gradient cannot be saved again.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    workdirs.prepare_workdir(out)
    with workdirs.locked(out):
        workdirs.write_json(out / "config.json", configs[0].to_dict())
        workdirs.write_json(out / "members.json", [str(p.resolve()) for p in paths])
        return exports.export_saved_model(lambda path: tf.saved_model.save(
            module, path, signatures={"serving_default": serve}, options=options), out)


def _representative(config: Any, tokenizer: Tokenizer) -> Any:
    """Calibration inputs for int8: the first `config.calibration_reviews` training reviews,
    one at a time at their true lengths."""
    train, _, _ = input_pipeline.load_splits(config)
    for text, _ in train.take(config.calibration_reviews):
        ids = tokenizer.ids(text.numpy().decode("utf-8"))
        if ids:
            yield {"tokens": np.array([ids], np.int64)}


def config_of(model_path: str) -> Any:
    """The config of the run a model belongs to (`config.json` in a directory above it)."""
    found = deploy.run_config_file(model_path)
    if found:
        return run_config(found)
    path = pathlib.Path(model_path).expanduser().resolve()
    raise RecipeError(f"no config.json above {path}; pass a model inside a run's workdir "
                      "(WORKDIR/export/N or WORKDIR/deploy/FILE)")


def print_predictions(model_path: str, texts: list[str]) -> None:
    """Prints `label  probability  text` for each text."""
    if not texts:
        raise RecipeError('predict needs texts: predict --model=PATH "text" ...')
    for text, p in zip(texts, predictor(model_path)(texts), strict=True):
        print(f"{'positive' if p >= 0.5 else 'negative'}\t{p:.4f}\t{text[:70]!r}")


def predictor(model_path: str) -> Callable[[list[str]], np.ndarray]:
    """P(positive) of texts with a SavedModel (raw text in) or a deployed model file.

    Deployed models get the texts tokenized by `Tokenizer`, TFLite one at a
    time, ONNX as one right-padded batch. A text with no tokens has no
    sequence to run: it gets `empty_probability` (the SavedModel's answer).
    """
    path = pathlib.Path(model_path).expanduser()
    if path.is_dir():
        serve = tf.saved_model.load(str(exports.latest_export(str(path)))).signatures[
            "serving_default"]
        return lambda texts: serve(text=tf.constant(texts))["probability"].numpy()
    model = deploy.Model(path)
    try:
        tokenizer = Tokenizer.from_dir(path.parent)
        empty = json.loads((path.parent / "tokenizer.json").read_text())["empty_probability"]
    except (OSError, ValueError, KeyError) as e:
        raise RecipeError(f"no tokenizer beside {path} ({e}); deploy directories hold "
                          "vocab.txt and tokenizer.json (`export` writes them)") from None

    def predict(texts: list[str]) -> np.ndarray:
        ids = [tokenizer.ids(t) for t in texts]
        probabilities = np.full(len(texts), empty, np.float32)
        if model.format == "tflite":
            for k, row in enumerate(ids):
                if row:
                    out = model(tokens=np.array([row], np.int64))["probability"]
                    probabilities[k] = out.reshape(-1)[0]
            return probabilities
        real = [k for k, row in enumerate(ids) if row]
        if real:
            width = max(len(ids[k]) for k in real)
            batch = np.zeros((len(real), width), np.int64)
            for j, k in enumerate(real):
                batch[j, :len(ids[k])] = ids[k]
            probabilities[real] = model(tokens=batch)["probability"].reshape(-1)
        return probabilities

    return predict


def accuracy(model_path: str, config: Any, split: str, batch_size: int = 256) -> dict:
    """Accuracy of any format on a split of the run's dataset (raw texts through `predictor`)."""
    predict = predictor(model_path)
    (data,) = input_pipeline.load_texts(config, [split])
    correct = total = 0
    for texts, labels in data.batch(batch_size):
        batch = [t.decode("utf-8") for t in texts.numpy()]
        correct += int(np.sum((predict(batch) >= 0.5) == labels.numpy().astype(bool)))
        total += len(batch)
    return {"accuracy": correct / max(total, 1), "examples": total}
