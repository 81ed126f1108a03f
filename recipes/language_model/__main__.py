"""LSTM language models: char-level Tiny Shakespeare, word-level Penn Treebank and IMDB.

Train (default config = char-level Shakespeare; variants ptb_small, ptb_medium, imdb, smoke,
imdb_smoke):
    python -m recipes.language_model --workdir=runs/shakespeare \\
        [--config=configs/language_model.py:ptb_small] [--config.epochs=2 ...]
Deployment artifacts (streaming TFLite step model, ONNX) of a finished run:
    python -m recipes.language_model export --workdir=runs/shakespeare [--format=tflite,onnx]
Sample from an export or a deployed model:
    python -m recipes.language_model sample --model=runs/shakespeare/export \\
        --prompt="ROMEO:" --num_tokens=200 --temperature=0.8 [--top_k=0]
    python -m recipes.language_model sample --model=runs/shakespeare/deploy/model.tflite ...
Score a text file with an export (cross-entropy, perplexity, bits per character):
    python -m recipes.language_model score --model=runs/ptb_small/export FILE
"""

import os

from absl import flags

import configs
from recipes.common import cli, deploy, errors, workdirs

_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write everything "
                               "(default: runs/language_model/<timestamp>); for `export`, "
                               "the finished run.")
_MODEL = flags.DEFINE_string("model", None, "For `sample` and `score`: a SavedModel export "
                             "(WORKDIR/export or a version in it); `sample` also takes a "
                             "deployed model file (WORKDIR/deploy/model.tflite, ...).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Same as --model (a SavedModel export).")
FORMATS = [f for f in deploy.FORMATS if f != "tflite_int8"]
_FORMAT = flags.DEFINE_list("format", ",".join(FORMATS),
                            f"For `export`: the formats to write ({', '.join(FORMATS)}).")
_PROMPT = flags.DEFINE_string("prompt", "", "For `sample`: the text to continue.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200, "For `sample`: tokens to generate.",
                                   lower_bound=0)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "For `sample`: softmax temperature "
                                  "(0: always the most likely token).", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "For `sample`: sample among the k most likely "
                              "tokens only (0: all).", lower_bound=0)
_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(configs.__file__), "language_model.py"),
    "Config file, optionally with a variant: configs/language_model.py:ptb_small.")

COMMANDS = ("sample", "score", "export")


def main(argv: list[str]) -> None:
    command, args = (argv[1], argv[2:]) if len(argv) > 1 else ("train", [])
    if command not in ("train", *COMMANDS):
        raise errors.RecipeError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")
    if args and command != "score":
        raise errors.RecipeError(f"{command} takes flags only, not {' '.join(args)!r}")
    if command == "train":
        from recipes.language_model import train

        train.train_and_evaluate(_CONFIG.value,
                                 _WORKDIR.value or workdirs.default_workdir("language_model"),
                                 cli.strategy_from_flags())
        return
    from recipes.language_model import deploy as lm_deploy

    model = _MODEL.value or _EXPORT_DIR.value
    if command == "export":
        cli.print_export(lm_deploy.export, _WORKDIR.value, _FORMAT.value)
    elif not model:
        raise errors.RecipeError(f"{command} needs --model=WORKDIR/export")
    elif command == "sample":
        print(_PROMPT.value + lm_deploy.sample(model, _PROMPT.value, _NUM_TOKENS.value,
                                               _TEMPERATURE.value, _TOP_K.value))
    else:
        for line in lm_deploy.score(model, args):
            print(line)


if __name__ == "__main__":
    cli.run(main)
