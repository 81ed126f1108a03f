"""Serving latency of the sentiment model in every format, side by side, on real IMDB reviews.

    python -m recipes.sentiment --workdir=runs/sentiment            # the trained model
    python -m recipes.sentiment export --workdir=runs/sentiment     # its deployment formats
    python benchmarks/serving_latency.py --workdir=runs/sentiment   # docs/benchmarks.md: its table

Requests are real IMDB test reviews of at least 230 tokens, cut to their first 230
token ids (the recipe's tokenizer), one review (batch 1) or 32 (batch 32) per request.
Contenders, all with the run's trained weights:

* `lstm_tf SavedModel`: the recipe's serving computation on token ids
  (`recipes.sentiment.serving`: the embedding folded into the input projections, each
  direction one loop that pools as it goes), exported, served by `tf.saved_model.load`;
  `... (text in)`: the recipe's own export, tokenization included; `... (model.export)`:
  the Keras model itself, `model.export` (our layers' own inference path, nothing folded);
* `keras.layers SavedModel`: the same architecture built from `keras.layers`
  (`Bidirectional(LSTM)`), same weights, `model.export`;
* `TFLite float` / `TFLite int8`: `WORKDIR/deploy/*.tflite` in LiteRT (default delegates),
  one review per invocation (a batch of 32 is 32 invocations);
* `ONNX`: `WORKDIR/deploy/model.onnx` in onnxruntime (CPU), a batch per call;
* `torch eager` (and `torch.jit.trace`): `torch.nn.LSTM(bidirectional=True)` with the
  weights mapped, `torch.inference_mode()`.

Every float contender's probabilities are checked against the SavedModel's before timing
(1e-4; int8's largest difference is reported, its accuracy measured by `evaluate`).
Contenders run in blocks of requests, in 5 rounds, a new random order of contenders each round
(`measure`: machine noise hits all alike, and the threads a runtime leaves spinning after a call
slow only the next block's untimed warm-up); the table gives p50 and p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recipes.common import deploy, exports  # noqa: E402
from recipes.sentiment import deploy as sentiment_deploy  # noqa: E402
from recipes.sentiment import input_pipeline, serving  # noqa: E402
from recipes.sentiment import model as models  # noqa: E402
from recipes.sentiment.tokenizer import Tokenizer  # noqa: E402

try:
    import torch
except ImportError:  # the `bench` extra
    torch = None

LENGTH = 230
BATCHES = (1, 32)


def reviews(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
            count: int) -> tuple[np.ndarray, list[str]]:
    """IMDB test reviews at least LENGTH tokens long, cut to LENGTH tokens.

    Returns their ids `[count, LENGTH]` and, for the text-in SavedModel, their first
    LENGTH tokens joined by spaces (which tokenize to the same ids).
    """
    (test,) = input_pipeline.load_texts(config, ["test"])
    rows, texts = [], []
    for text, _ in test.as_numpy_iterator():
        tokens = tokenizer.tokens(text.decode("utf-8"))
        if len(tokens) >= LENGTH:
            texts.append(" ".join(tokens[:LENGTH]))
            rows.append(tokenizer.ids(texts[-1]))
        if len(rows) == count:
            break
    return np.array(rows, np.int64), texts


def keras_built(config: ml_collections.ConfigDict, weights: list) -> keras.Model:
    """The recipe's architecture from `keras.layers` (the Bi-LSTM is Keras's own)."""
    tokens = keras.Input((None,), dtype="int64")
    x = keras.layers.Embedding(config.vocab_size, config.embedding_dim, mask_zero=True)(tokens)
    for _ in range(config.num_layers):
        x = keras.layers.Bidirectional(keras.layers.LSTM(config.lstm_units,
                                                         return_sequences=True))(x)
    x = models.MaskedMeanMaxPooling()(x)
    model = keras.Model(tokens, keras.layers.Dense(1, activation="sigmoid")(x))
    model.set_weights(weights)
    return model


def saved_model(model: keras.Model, directory: str) -> Callable[[np.ndarray], np.ndarray]:
    """`model` through `model.export` and `tf.saved_model.load`, as a server loads it."""
    model.export(directory, verbose=False)
    loaded = tf.saved_model.load(directory)  # (the closure keeps it, and its variables, alive)
    return lambda ids: loaded.serve(tf.constant(ids)).numpy().reshape(-1)


def serving_saved_model(model: keras.Model, config: ml_collections.ConfigDict,
                        directory: str) -> Callable[[np.ndarray], np.ndarray]:
    """The recipe's serving computation on token ids, exported and loaded like `saved_model`."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    probability = serving.probability_function(model, config)
    archive.add_endpoint("serve", tf.function(
        probability, input_signature=[tf.TensorSpec([None, None], tf.int64)]))
    archive.write_out(directory, verbose=False)
    loaded = tf.saved_model.load(directory)
    return lambda ids: loaded.serve(tf.constant(ids)).numpy()


def torch_model(config: ml_collections.ConfigDict, weights: list) -> torch.nn.Module:
    """Embedding → nn.LSTM(bidirectional) → mean+max pooling → Linear → sigmoid, mapped weights.

    (One Bi-LSTM layer; the benchmark's reviews have no padding, so the pooling needs no mask.)
    """
    if config.num_layers != 1:
        raise SystemExit("the torch contender maps one Bi-LSTM layer")

    class Sentiment(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(config.vocab_size, config.embedding_dim)
            self.lstm = torch.nn.LSTM(config.embedding_dim, config.lstm_units,
                                      batch_first=True, bidirectional=True)
            self.dense = torch.nn.Linear(4 * config.lstm_units, 1)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            y, _ = self.lstm(self.embedding(ids))
            pooled = torch.cat([y.mean(dim=1), y.amax(dim=1)], dim=-1)
            return torch.sigmoid(self.dense(pooled))[:, 0]

    net = Sentiment().eval()
    embedding, k_f, r_f, b_f, k_b, r_b, b_b, dense_k, dense_b = weights
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        net.embedding.weight.copy_(t(embedding))
        for suffix, (k, r, b) in (("", (k_f, r_f, b_f)), ("_reverse", (k_b, r_b, b_b))):
            getattr(net.lstm, f"weight_ih_l0{suffix}").copy_(t(k.T))  # same gate order
            getattr(net.lstm, f"weight_hh_l0{suffix}").copy_(t(r.T))
            getattr(net.lstm, f"bias_ih_l0{suffix}").copy_(t(b))
            getattr(net.lstm, f"bias_hh_l0{suffix}").zero_()
        net.dense.weight.copy_(t(dense_k.T))
        net.dense.bias.copy_(t(dense_b))
    return net


def contenders(workdir: pathlib.Path, config: ml_collections.ConfigDict, scratch: str,
               sample: np.ndarray, texts: dict[tuple, str]
               ) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """name → function of `[batch, LENGTH]` ids returning P(positive) `[batch]`.

    `texts`: each row's text, for the text-in SavedModel.
    """
    ours = sentiment_deploy.token_model(config, workdir)
    weights = ours.get_weights()
    text_in = tf.saved_model.load(str(exports.latest_export(str(workdir / "export"))))
    found = {
        "lstm_tf SavedModel": serving_saved_model(ours, config, os.path.join(scratch, "ours")),
        "lstm_tf SavedModel (text in)": lambda ids: text_in.signatures["serving_default"](
            text=tf.constant([texts[tuple(row)] for row in ids]))["probability"].numpy(),
        "lstm_tf SavedModel (model.export)": saved_model(ours, os.path.join(scratch, "plain")),
        "keras.layers SavedModel": saved_model(keras_built(config, weights),
                                               os.path.join(scratch, "keras")),
    }
    for name, file in (("TFLite float", "model.tflite"), ("TFLite int8", "model_int8.tflite"),
                       ("ONNX", "model.onnx")):
        path = workdir / "deploy" / file
        if not path.exists():
            print(f"(no {path}: run `python -m recipes.sentiment export --workdir={workdir}`)")
            continue
        model = deploy.Model(path)
        if model.format == "tflite":
            found[name] = lambda ids, m=model: np.concatenate(
                [m(tokens=row[None])["probability"].reshape(-1) for row in ids])
        else:
            found[name] = lambda ids, m=model: m(tokens=ids)["probability"].reshape(-1)
    if torch is not None:
        net = torch_model(config, weights)

        def eager(ids: np.ndarray, net: torch.nn.Module = net) -> np.ndarray:
            with torch.inference_mode():
                return net(torch.from_numpy(ids)).numpy()

        found["torch eager"] = eager
        with torch.inference_mode():
            traced = torch.jit.trace(net, torch.from_numpy(sample[:1]))
        found["torch.jit.trace"] = lambda ids: eager(ids, traced)
    else:
        print("(torch is not installed: pip install -e '.[bench]')")
    return found


def check(found: dict[str, Callable], sample: np.ndarray) -> dict[str, float]:
    """Every float contender gives the SavedModel's probabilities (to 1e-4).

    Returns each contender's largest difference (int8's is reported, not checked:
    its accuracy is measured by `python -m recipes.sentiment evaluate`).
    """
    expected = found["lstm_tf SavedModel"](sample)
    differences = {}
    for name, predict in found.items():
        differences[name] = float(np.abs(predict(sample) - expected).max())
        if "int8" not in name and differences[name] > 1e-4:
            raise SystemExit(f"{name} disagrees with the SavedModel: max difference "
                             f"{differences[name]:.2g}")
    return differences


def measure(found: dict[str, Callable], data: np.ndarray, batch: int, requests: int,
            rounds: int = 5, warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds per request for each contender: `rounds` rounds, in each a block of
    `requests / rounds` timed requests per contender (after `warmup` untimed ones), the
    contenders in a new random order each round.

    (Blocks, not one request each in turn: a runtime's threads spin on for a while after a
    call, as torch's OpenMP and onnxruntime's pools do, and slow whoever runs next; in a
    block only the untimed warm-up requests pay for that. Rounds spread machine noise.)
    """
    names = list(found)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = np.random.default_rng(0)
    per_round = max(requests // rounds, 1)
    for round_ in range(rounds):
        for name in order.permutation(names):
            for r in range(warmup + per_round):
                first = (round_ * per_round + r) * batch
                rows = np.take(data, range(first, first + batch), axis=0, mode="wrap")
                start = time.perf_counter()
                found[name](rows)
                if r >= warmup:
                    times[name].append(1000 * (time.perf_counter() - start))
    return times


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/sentiment", help="a trained, exported run")
    parser.add_argument("--requests", type=int, default=200, help="requests of batch 1")
    parser.add_argument("--batch_requests", type=int, default=40, help="requests of batch 32")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    if not (workdir / "export").is_dir():
        parser.error(f"{workdir} has no export: train it first (see the docstring)")
    config = sentiment_deploy.run_config(workdir / "config.json")
    if config.ngrams > 1:
        parser.error(f"{workdir} tokenizes with n-grams (config.ngrams={config.ngrams}); the "
                     "benchmark cuts reviews to their first 230 single tokens: pass a run "
                     "without n-grams (the default config)")
    tokenizer = Tokenizer.from_run(workdir, config)
    data, texts = reviews(config, tokenizer, 32 * 20)
    with tempfile.TemporaryDirectory() as scratch:
        found = contenders(workdir, config, scratch, data[:32],
                           {tuple(row): text for row, text in zip(data, texts, strict=True)})
        differences = check(found, data[:32])
        results = {1: measure(found, data, 1, args.requests),
                   32: measure(found, data, 32, args.batch_requests)}
    keras_p50 = {b: statistics.median(results[b]["keras.layers SavedModel"]) for b in BATCHES}
    print(f"\n{len(data)} IMDB test reviews, {LENGTH} token ids each; TF {tf.__version__}, "
          f"Keras {keras.__version__}" + (f", torch {torch.__version__}" if torch else ""))
    print("\n| contender | batch 1 p50 ms | p95 | vs keras.layers | batch 32 p50 ms | p95 | "
          "vs keras.layers | max \\|ΔP\\| |\n| --- |" + " ---: |" * 7)
    table = {}
    for name in found:
        cells = []
        for batch in BATCHES:
            p50 = statistics.median(results[batch][name])
            table.setdefault(name, {})[batch] = {"p50": p50, "p95": p95(results[batch][name])}
            cells += [f"{p50:.2f}", f"{p95(results[batch][name]):.2f}",
                      f"{keras_p50[batch] / p50:.2f}x"]
        table[name]["max_difference"] = differences[name]
        print(f"| {name} | " + " | ".join(cells) + f" | {differences[name]:.1e} |")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
