"""Bi-LSTM sentiment on IMDB.

Train (default config = the real recipe; `:smoke` = a tiny run):
    python -m recipes.sentiment --workdir=runs/sentiment [--config=configs/sentiment.py:smoke]
        [--config.epochs=2 ...]
Predict with an export:
    python -m recipes.sentiment predict --export_dir=runs/sentiment/export "Great film!" ...
"""

import os

from absl import flags

import configs
from lstm_tf import recipe

_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write everything "
                               "(default: runs/sentiment/<timestamp>).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "For `predict`: an export "
                                  "version directory, or WORKDIR/export (latest version).")
_CONFIG = recipe.define_config(
    "config", os.path.join(os.path.dirname(configs.__file__), "sentiment.py"),
    "Config file, optionally with a variant: configs/sentiment.py:smoke.")


def predict(export_dir: str | None, texts: list[str]) -> None:
    """Prints `label  probability  text` for each text."""
    import tensorflow as tf

    if not export_dir:
        raise recipe.RecipeError("predict needs --export_dir=WORKDIR/export")
    if not texts:
        raise recipe.RecipeError('predict needs texts: predict --export_dir=DIR "text" ...')
    serve = tf.saved_model.load(str(recipe.latest_export(export_dir))).signatures[
        "serving_default"]
    out = serve(text=tf.constant(texts))
    labels, probabilities = out["label"].numpy(), out["probability"].numpy()
    for text, label, p in zip(texts, labels, probabilities, strict=True):
        print(f"{'positive' if label else 'negative'}\t{p:.4f}\t{text[:70]!r}")


def main(argv: list[str]) -> None:
    command = argv[1:]
    if command and command[0] == "predict":
        return predict(_EXPORT_DIR.value, command[1:])
    if command:
        raise recipe.RecipeError(f"unknown command {command[0]!r} (known: predict)")
    from recipes.sentiment import train

    train.train_and_evaluate(_CONFIG.value,
                             _WORKDIR.value or recipe.default_workdir("sentiment"),
                             recipe.strategy_from_flags())


if __name__ == "__main__":
    recipe.run(main)
