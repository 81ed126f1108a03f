"""What the Bi-LSTM does with one text: its gates, its cell states, each token's influence.

* `explain_function(model, vectorizer, config)`: the export's `explain` signature (text in;
  the tokens, the first Bi-LSTM layer's gates and states per direction, the probability);
* `explain(export_dir, texts)`: that signature, plus each token's influence on P(positive)
  by occlusion (P of the text minus P of the text without the token), from the export alone;
* `table(...)` and `picture(...)`: a per-token table and one PNG (heatmaps of the gates over
  the units, the cell-state norm, the influences), for the `explain` command and for
  TensorBoard (`ExplainImages`, on `config.explain_texts` each epoch).
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lstm_tf.diagnostics import trace
from recipes.common import exports
from recipes.common.errors import RecipeError
from recipes.sentiment import input_pipeline
from recipes.sentiment import model as models

GATES = ("forget_gate", "input_gate", "output_gate")
DIRECTIONS = ("forward", "backward")


def explain_function(model: keras.Model, vectorizer: keras.layers.TextVectorization,
                     config: Any) -> tf.types.experimental.PolymorphicFunction:
    """`explain(text)`: `text` string `[batch]` → what the first Bi-LSTM layer computes.

    Outputs: `tokens` string `[batch, time]` (empty past a text's end),
    `separator` string `[batch]` (what joins the tokens back into a text: " " for
    words, "" for characters), `forget_gate`, `input_gate`, `output_gate`,
    `cell_state`, `hidden_state` float32 `[batch, 2, time, units]` (direction 0
    forward, 1 backward, both at the tokens' positions; 0 past a text's end) and
    `probability` float32 `[batch]`. Masked like the model: a text's values alone
    equal its values inside a padded batch.
    """
    embedding, bidirectional = models.first_layers(model)
    separator = "" if config.split == "character" else " "

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def explain(text: tf.Tensor) -> dict[str, tf.Tensor]:
        ids = input_pipeline.to_ids(vectorizer, text, config.max_length)
        tokens = input_pipeline.tokens(text, config).to_tensor("")
        tokens = tf.pad(tokens, [[0, 0], [0, tf.shape(ids)[1] - tf.shape(tokens)[1]]])
        x, mask = embedding(ids), tf.not_equal(ids, 0)  # (dropout is off at inference)
        traced = [trace(layer, x, mask) for layer in (bidirectional.forward_layer,
                                                      bidirectional.backward_layer)]
        both = {name: tf.stack([t[part] for t in traced], axis=1) for name, part in (
            ("forget_gate", "forget"), ("input_gate", "input"), ("output_gate", "output"),
            ("cell_state", "cell"), ("hidden_state", "hidden"))}
        return {"tokens": tokens, "separator": tf.fill(tf.shape(text), separator),
                "probability": model(ids, training=False)[:, 0], **both}

    return explain


def explanations(explain: Callable, predict: Callable[[list[str]], np.ndarray],
                 texts: list[str]) -> list[dict[str, Any]]:
    """Per text: its tokens, gates and states (numpy, real tokens only) and influences.

    Influence of token k: P(positive | text) − P(positive | the text without token
    k), by `predict` (occlusion: what the model says without it). With n-grams
    (tokens holding a space, after the single tokens), only the single tokens are
    removed; an n-gram's influence is NaN.
    """
    out = {k: v.numpy() for k, v in explain(tf.constant(texts)).items()}
    results = []
    for row, text in enumerate(texts):
        tokens = [t.decode("utf-8") for t in out["tokens"][row] if t]
        n = len(tokens)
        result = {"text": text, "tokens": tokens,
                  "probability": float(out["probability"][row])}
        for name in (*GATES, "cell_state", "hidden_state"):
            result[name] = out[name][row][:, :n]  # [2, n, units]
        separator = out["separator"][row].decode("utf-8")
        single = [t for t in tokens if " " not in t]
        without = [separator.join(single[:k] + single[k + 1:]) for k in range(len(single))]
        influence = np.full(n, np.nan)
        if single:
            influence[:len(single)] = result["probability"] - predict(without)
        result["influence"] = influence
        results.append(result)
    return results


def table(result: dict[str, Any]) -> str:
    """One line per token: fw and bw mean f, i, o and ‖C_t‖, and its influence."""
    lines = [f"{result['text'][:70]!r}: P(positive) = {result['probability']:.4f}"]
    if not result["tokens"]:
        return lines[0] + "\n(no tokens)"
    lines.append("token\tfw f\tfw i\tfw o\tfw |C|\tbw f\tbw i\tbw o\tbw |C|\tinfluence")
    for k, token in enumerate(result["tokens"]):
        cells = []
        for d in range(2):
            cells += [f"{result[g][d, k].mean():.3f}" for g in GATES]
            cells.append(f"{np.linalg.norm(result['cell_state'][d, k]):.3f}")
        influence = result["influence"][k]
        lines.append("\t".join([token, *cells, "-" if np.isnan(influence) else
                                f"{influence:+.4f}"]))
    return "\n".join(lines)


def picture(results: list[dict[str, Any]]) -> bytes:
    """One PNG for the texts: per text, heatmaps of each gate per direction (units × tokens),
    the cell-state norm per direction, and each token's influence on P(positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = _cjk_font()
    if font:
        plt.rcParams["font.family"] = ["DejaVu Sans", font]
    longest = max([len(r["tokens"]) for r in results] + [1])
    rows = sum(8 if r["tokens"] else 1 for r in results)
    figure = plt.figure(figsize=(min(4 + 0.28 * longest, 60), 1.35 * rows + 0.6), dpi=100)
    grid = figure.add_gridspec(rows, 1, hspace=0.6)
    row = 0
    for result in results:
        title = (f"{_shown(result['text'][:80], font)!r}   "
                 f"P(positive) = {result['probability']:.3f}")
        if not result["tokens"]:
            axes = figure.add_subplot(grid[row])
            axes.axis("off")
            axes.text(0.5, 0.5, f"{title}\nno tokens: nothing for the LSTM to read",
                      ha="center", va="center")
            row += 1
            continue
        labels = [_shown(t, font) for t in result["tokens"]]
        n = len(labels)
        for d, direction in enumerate(DIRECTIONS):
            for g, gate in enumerate(GATES):
                axes = figure.add_subplot(grid[row])
                image = axes.imshow(result[gate][d].T, aspect="auto", cmap="viridis",
                                    vmin=0.0, vmax=1.0, interpolation="nearest")
                axes.set_ylabel(f"{direction}\n{gate.split('_')[0]} gate", fontsize=8)
                axes.set_xticks([])
                axes.set_yticks([])
                if row == 0 or (d == 0 and g == 0):
                    axes.set_title(title, fontsize=10, loc="left")
                row += 1
        figure.colorbar(image, ax=figure.axes[-6:], fraction=0.02, pad=0.01, label="gate")
        axes = figure.add_subplot(grid[row])
        for d, direction in enumerate(DIRECTIONS):
            axes.plot(range(n), np.linalg.norm(result["cell_state"][d], axis=-1), marker=".",
                      label=f"{direction} ‖C_t‖")
        axes.set_xlim(-0.5, n - 0.5)
        axes.set_xticks([])
        axes.legend(fontsize=7, loc="upper right")
        row += 1
        axes = figure.add_subplot(grid[row])
        influence = result["influence"]
        axes.bar(range(n), np.nan_to_num(influence),
                 color=["tab:green" if v >= 0 else "tab:red" for v in influence])
        axes.axhline(0, color="gray", linewidth=0.5)
        axes.set_xlim(-0.5, n - 0.5)
        axes.set_ylabel("influence\non P(pos)", fontsize=8)
        axes.set_xticks(range(n), labels, rotation=90 if n > 12 else 0, fontsize=9)
        row += 1
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _shown(text: str, font: str | None) -> str:
    """`text` with the characters no font here can draw as code points (U+6211): CJK
    characters without a CJK font, emoji always (and no missing-glyph warnings)."""
    def drawable(c: str) -> bool:
        return ord(c) < 0x2E80 or (font is not None and ord(c) < 0x1F000)

    return "".join(c if drawable(c) else f"U+{ord(c):04X}" for c in text)


def _cjk_font() -> str | None:
    """An installed font with Chinese characters (matplotlib's default has none)."""
    from matplotlib import font_manager

    names = ("CJK", "WenQuanYi", "Droid Sans Fallback", "SimHei", "Heiti", "PingFang",
             "Source Han", "Noto Sans SC", "AR PL")
    for font in font_manager.fontManager.ttflist:
        if any(name in font.name for name in names):
            return font.name
    return None


def explain(export_dir: str, texts: list[str], out: str) -> list[dict[str, Any]]:
    """The `explain` command: prints a table per text and writes one PNG to `out`."""
    if not texts:
        raise RecipeError('explain needs texts: explain --model=EXPORT --out=FILE.png "text"')
    if not out:
        raise RecipeError("explain needs --out=FILE.png")
    path = pathlib.Path(out).expanduser()
    try:  # before any work: a picture that cannot be written is a mistake to report now
        probe = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        raise RecipeError(f"cannot write {path} ({e.strerror or e})") from None
    exported = exports.latest_export(export_dir)
    loaded = tf.saved_model.load(str(exported))
    if "explain" not in loaded.signatures:
        raise RecipeError(f"the export {exported} has no `explain` signature (an export of "
                          "another recipe, of --config.model=ngrams, which has no LSTM, or of "
                          "an older version of this one; export that run again with this one)")
    serve = loaded.signatures["serving_default"]
    results = explanations(loaded.signatures["explain"],
                           lambda texts: serve(text=tf.constant(texts))["probability"].numpy(),
                           texts)
    for result in results:
        print(table(result) + "\n")
    exports.write_atomically(lambda tmp: pathlib.Path(tmp).write_bytes(picture(results)), path)
    return results


class ExplainImages(keras.callbacks.Callback):
    """Each epoch, `picture` of `texts` by the model being trained, to TensorBoard."""

    def __init__(self, logdir: pathlib.Path, texts: list[str], vectorizer: Any,
                 config: Any) -> None:
        super().__init__()
        self.logdir, self.texts = str(logdir), list(texts)
        self.vectorizer, self.config = vectorizer, config
        self.writer: Any = None
        self.explain: Any = None
        self.probabilities: Any = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.texts:
            return
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(self.logdir)
            # Traced once, they read the weights as they are at each call.
            self.explain = explain_function(self.model, self.vectorizer, self.config)
            self.probabilities = tf.function(
                lambda text: self.model(input_pipeline.to_ids(
                    self.vectorizer, text, self.config.max_length), training=False)[:, 0],
                input_signature=[tf.TensorSpec([None], tf.string)])

        def predict(texts: list[str]) -> np.ndarray:
            return self.probabilities(tf.constant(texts)).numpy()

        png = picture(explanations(self.explain, predict, self.texts))
        with self.writer.as_default():
            tf.summary.image("explain", tf.image.decode_png(png)[None], step=epoch + 1)
        self.writer.flush()
