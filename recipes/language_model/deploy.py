"""Deployment of a finished run: a streaming step model, and generation through it.

`export(workdir, formats)` writes `WORKDIR/deploy/`: the step model as TFLite
(batch 1, one token per call: token, h, c → logits, h, c, so that generation
streams on a device with the state kept by the caller; float and dynamic-range)
and ONNX (any batch and length, with a mask: the same signature as the
SavedModel's step model), with `vocab.json` and `tokenizer.json` beside them.
`Streamer` runs any of them from Python (tokenization included) and
generates as the SavedModel's `generate` does.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Any

import numpy as np
import tensorflow as tf

from recipes.common import deploy, exports
from recipes.common import language_models as models
from recipes.common.errors import RecipeError
from recipes.common.text import standardize_str


def export(workdir: str, formats: list[str]) -> dict[str, pathlib.Path]:
    """Writes the `formats` of `workdir`'s model into `workdir/deploy/`; returns their paths."""
    formats = deploy.check_formats(formats)
    if "tflite_int8" in formats:
        raise RecipeError(
            "--format=tflite_int8 is not offered for the language model: LiteRT 2.3 crashes "
            "(a segmentation fault) running a full-integer LSTM whose state is a model "
            "input; tflite_dynamic has int8 weights")
    path, config, vocab = models.finished_run(workdir)
    names = output_names(config)

    def to_onnx() -> bytes:
        model = models.trained_step_model(config, vocab, path)
        return deploy.onnx(deploy.named_outputs(model, names), [
            tf.TensorSpec(i.shape, i.dtype, name=i.name) for i in model.inputs])

    def to_tflite(quantization: str) -> bytes:
        streaming = models.trained_step_model(config, vocab, path, batch_size=1, steps=1,
                                              masked=False)
        return deploy.tflite(streaming, quantization, output_names=names)

    settings = {k: config[k] for k in SETTINGS}
    settings["standardize"] = config.get("standardize", "")
    settings["reverse"] = config.get("reverse", False)  # (true: reads text backwards)
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
             "tokenizer.json": json.dumps(settings, indent=2, ensure_ascii=False).encode("utf-8")}
    return deploy.export(path, formats, to_onnx, to_tflite, lambda: files)


def output_names(config: Any) -> list[str]:
    """`logits`, then `h0_out, c0_out, h1_out, ...`: the deployed step model's outputs."""
    return ["logits", *(f"{k}{i}_out" for i in range(config.num_layers) for k in "hc")]


# What `Streamer` needs of the run's config (`tokenizer.json` beside the model).
SETTINGS = ("level", "start_token", "unknown_token", "units", "num_layers")


class Streamer:
    """Generation with a deployed step model (`.tflite` or `.onnx`), one token per call."""

    def __init__(self, model_path: str | pathlib.Path) -> None:
        self.model = deploy.Model(model_path)
        directory = self.model.path.parent
        try:
            self.settings = json.loads((directory / "tokenizer.json").read_text())
            vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RecipeError(f"no tokenizer beside {self.model.path} ({e}); deploy "
                              "directories hold vocab.json and tokenizer.json") from None
        missing = [k for k in SETTINGS if k not in self.settings]
        if missing:
            raise RecipeError(f"{directory / 'tokenizer.json'} has no {missing[0]!r}: "
                              f"{self.model.path} is not a deployed language model")
        self.tokens = [self.settings["unknown_token"], *vocab]  # id 0: unknown
        self.ids_of = {token: k for k, token in enumerate(self.tokens)}

    def ids(self, text: str) -> list[int]:
        """The start token, then `text`'s tokens (`input_pipeline.tokenize` in Python)."""
        if self.settings["level"] == "char":
            tokens = list(text)
        else:
            if self.settings.get("standardize") == "sentiment":
                text = standardize_str(text)
            tokens = [t for t in re.split(r"[ \t\n\v\f\r]+", text.replace("\n", " <eos> "))
                      if t]
        return [self.ids_of.get(t, 0) for t in [self.settings["start_token"], *tokens]]

    def step(self, token: int, states: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """One token in: `(logits [vocab], new states)`."""
        names = [f"{k}{i}" for i in range(self.settings["num_layers"]) for k in "hc"]
        inputs = {"tokens": np.array([[token]], np.int32), **dict(zip(names, states,
                                                                      strict=True))}
        if self.model.format == "onnx":
            inputs["mask"] = np.ones((1, 1), bool)
        out = self.model(**inputs)
        return out["logits"].reshape(-1), [out[f"{name}_out"] for name in names]

    def generate(self, prompt: str, num_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, seed: int | None = None) -> str:
        """The continuation of `prompt`, as the SavedModel's `generate` returns it."""
        rng = np.random.default_rng(seed)
        states = [np.zeros((1, self.settings["units"]), np.float32)
                  for _ in range(2 * self.settings["num_layers"])]
        for token in self.ids(prompt):
            logits, states = self.step(token, states)
        chosen = []
        for _ in range(num_tokens):
            if top_k > 0:
                logits = np.where(logits < np.sort(logits)[-min(top_k, len(logits))],
                                  -1e9, logits)
            if temperature > 0:
                p = np.exp((logits - logits.max()) / temperature)
                token = int(rng.choice(len(p), p=p / p.sum()))
            else:
                token = int(np.argmax(logits))
            chosen.append(self.tokens[token])
            logits, states = self.step(token, states)
        if self.settings["level"] == "char":
            return "".join(chosen)
        return re.sub(" <eos> ?", "\n", "".join(" " + t for t in chosen))


def _signature(export_dir: str, name: str) -> Any:
    return tf.saved_model.load(str(exports.latest_export(export_dir))).signatures[name]


def sample(model_path: str, prompt: str, num_tokens: int, temperature: float,
           top_k: int) -> str:
    """The continuation of `prompt` by a SavedModel export or a deployed model file."""
    if pathlib.Path(model_path).expanduser().is_dir():
        out = _signature(model_path, "generate")(
            prompt=tf.constant([prompt]), num_tokens=tf.constant(num_tokens),
            temperature=tf.constant(temperature), top_k=tf.constant(top_k))
        return out["text"][0].numpy().decode("utf-8")
    return Streamer(model_path).generate(prompt, num_tokens, temperature, top_k)


def score(export_dir: str, files: list[str]) -> list[str]:
    """Tokens, cross-entropy (nats/token), perplexity and bits/token of each file."""
    if not files:
        raise RecipeError("score needs text files: score --model=DIR FILE ...")
    signature = _signature(export_dir, "score")
    lines = []
    for name in files:
        path = pathlib.Path(name)
        if not path.is_file():
            raise RecipeError(f"no file {path}")
        out = signature(text=tf.constant([path.read_text(encoding="utf-8")]))
        tokens = int(out["num_tokens"][0])
        nats = -float(out["total_log_prob"][0]) / max(tokens, 1)
        lines.append(f"{name}\ttokens {tokens}\tcross_entropy {nats:.4f}\t"
                     f"perplexity {math.exp(nats):.2f}\tbits_per_token {nats / math.log(2):.4f}")
    return lines
