"""LSTM language models: char-level Tiny Shakespeare, word-level Penn Treebank.

Train (default config = char-level Shakespeare; variants ptb_small, ptb_medium, smoke):
    python -m recipes.language_model --workdir=runs/shakespeare \\
        [--config=configs/language_model.py:ptb_small] [--config.epochs=2 ...]
Sample from an export:
    python -m recipes.language_model sample --export_dir=runs/shakespeare/export \\
        --prompt="ROMEO:" --num_tokens=200 --temperature=0.8 [--top_k=0]
Score a text file with an export (cross-entropy, perplexity, bits per character):
    python -m recipes.language_model score --export_dir=runs/ptb_small/export FILE
"""

import math
import os
import pathlib

from absl import flags

import configs
from lstm_tf import recipe

_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write everything "
                               "(default: runs/language_model/<timestamp>).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "For `sample` and `score`: an export "
                                  "version directory, or WORKDIR/export (latest version).")
_PROMPT = flags.DEFINE_string("prompt", "", "For `sample`: the text to continue.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200, "For `sample`: tokens to generate.",
                                   lower_bound=0)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "For `sample`: softmax temperature "
                                  "(0: always the most likely token).", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "For `sample`: sample among the k most likely "
                              "tokens only (0: all).", lower_bound=0)
_CONFIG = recipe.define_config(
    "config", os.path.join(os.path.dirname(configs.__file__), "language_model.py"),
    "Config file, optionally with a variant: configs/language_model.py:ptb_small.")


def _signature(command: str, name: str):  # noqa: ANN202 (a concrete function)
    import tensorflow as tf

    if not _EXPORT_DIR.value:
        raise recipe.RecipeError(f"{command} needs --export_dir=WORKDIR/export")
    return tf.saved_model.load(str(recipe.latest_export(_EXPORT_DIR.value))).signatures[name]


def sample() -> None:
    """Prints the prompt and its continuation."""
    import tensorflow as tf

    out = _signature("sample", "generate")(
        prompt=tf.constant([_PROMPT.value]), num_tokens=tf.constant(_NUM_TOKENS.value),
        temperature=tf.constant(_TEMPERATURE.value), top_k=tf.constant(_TOP_K.value))
    print(_PROMPT.value + out["text"][0].numpy().decode("utf-8"))


def score(files: list[str]) -> None:
    """Prints tokens, cross-entropy (nats/token), perplexity and bits/token of each file."""
    import tensorflow as tf

    if not files:
        raise recipe.RecipeError("score needs text files: score --export_dir=DIR FILE ...")
    signature = _signature("score", "score")
    for name in files:
        path = pathlib.Path(name)
        if not path.is_file():
            raise recipe.RecipeError(f"no file {path}")
        out = signature(text=tf.constant([path.read_text(encoding="utf-8")]))
        tokens = int(out["num_tokens"][0])
        nats = -float(out["total_log_prob"][0]) / max(tokens, 1)
        print(f"{name}\ttokens {tokens}\tcross_entropy {nats:.4f}\t"
              f"perplexity {math.exp(nats):.2f}\tbits_per_token {nats / math.log(2):.4f}")


def main(argv: list[str]) -> None:
    command = argv[1:]
    if command and command[0] == "sample":
        if command[1:]:
            raise recipe.RecipeError("sample takes flags only: sample --export_dir=DIR "
                                     '--prompt="ROMEO:"')
        return sample()
    if command and command[0] == "score":
        return score(command[1:])
    if command:
        raise recipe.RecipeError(f"unknown command {command[0]!r} (known: sample, score)")
    from recipes.language_model import train

    train.train_and_evaluate(_CONFIG.value,
                             _WORKDIR.value or recipe.default_workdir("language_model"),
                             recipe.strategy_from_flags())


if __name__ == "__main__":
    recipe.run(main)
