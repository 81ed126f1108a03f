"""Bi-LSTM sentiment on IMDB.

Train (default config = the real recipe; `:smoke` = a tiny run):
    python -m recipes.sentiment --workdir=runs/sentiment [--config=configs/sentiment.py:smoke]
        [--config.epochs=2 ...]
Deployment artifacts (TFLite float / dynamic-range / int8, ONNX) of a finished run:
    python -m recipes.sentiment export --workdir=runs/sentiment [--format=tflite,onnx]
Predict with the SavedModel export or any deployed model file:
    python -m recipes.sentiment predict --model=runs/sentiment/export "Great film!" ...
    python -m recipes.sentiment predict --model=runs/sentiment/deploy/model_int8.tflite "Dull."
Accuracy of any of them on a split (default: test):
    python -m recipes.sentiment evaluate --model=runs/sentiment/deploy/model_int8.tflite
One SavedModel averaging several exports' probabilities (an ensemble):
    python -m recipes.sentiment ensemble --workdir=runs/sentiment_ensemble \
        --models=runs/sentiment_a/export,runs/sentiment_b/export
The gates, cell states and token influences of texts, from an export (a table, one PNG):
    python -m recipes.sentiment explain --model=runs/sentiment_zh/export --out=zh.png "我爱中国"
"""

import json
import os

from absl import flags

import configs
from recipes.common import cli, deploy, errors, workdirs

_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write everything "
                               "(default: runs/sentiment/<timestamp>); for `export`, the "
                               "finished run.")
_MODEL = flags.DEFINE_string("model", None, "For `predict` and `evaluate`: a SavedModel "
                             "export (WORKDIR/export or a version in it) or a deployed model "
                             "file (WORKDIR/deploy/model.tflite, ...).")
_MODELS = flags.DEFINE_list("models", None, "For `ensemble`: the SavedModel exports to "
                            "average (WORKDIR/export, ...), two or more.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Same as --model (a SavedModel export).")
_FORMAT = flags.DEFINE_list("format", ",".join(deploy.FORMATS),
                            f"For `export`: the formats to write ({', '.join(deploy.FORMATS)}).")
_SPLIT = flags.DEFINE_string("split", "test", "For `evaluate`: the split of the run's dataset.")
_OUT = flags.DEFINE_string("out", None, "For `explain`: the PNG to write.")
_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(configs.__file__), "sentiment.py"),
    "Config file, optionally with a variant: configs/sentiment.py:smoke.")

COMMANDS = ("predict", "export", "evaluate", "explain", "ensemble")


def _model_flag(command: str) -> str:
    model = _MODEL.value or _EXPORT_DIR.value
    if not model:
        raise errors.RecipeError(f"{command} needs --model=WORKDIR/export" + (
            "" if command == "explain" else
            " (or a deployed model file, WORKDIR/deploy/model.tflite, ...)"))
    return model


def main(argv: list[str]) -> None:
    command, args = (argv[1], argv[2:]) if len(argv) > 1 else ("train", [])
    if command not in ("train", *COMMANDS) or (args and command not in ("predict", "explain")):
        raise errors.RecipeError(f"unknown command {' '.join(argv[1:])!r} "
                                 f"(known: {', '.join(COMMANDS)})")
    if command == "train":
        from recipes.sentiment import train

        train.train_and_evaluate(_CONFIG.value,
                                 _WORKDIR.value or workdirs.default_workdir("sentiment"),
                                 cli.strategy_from_flags())
        return
    from recipes.sentiment import deploy as sentiment_deploy

    if command == "explain":
        from recipes.sentiment import explain

        explain.explain(_model_flag("explain"), args, _OUT.value)
    elif command == "predict":
        sentiment_deploy.print_predictions(_model_flag("predict"), args)
    elif command == "export":
        cli.print_export(sentiment_deploy.export, _WORKDIR.value, _FORMAT.value)
    elif command == "ensemble":
        if not _WORKDIR.value:
            raise errors.RecipeError("ensemble needs --workdir=WORKDIR (where to write it)")
        print(sentiment_deploy.ensemble(_MODELS.value or [], _WORKDIR.value))
    else:
        model = _model_flag("evaluate")
        config = sentiment_deploy.config_of(model)
        print(json.dumps({"model": model, "split": _SPLIT.value,
                          **sentiment_deploy.accuracy(model, config, _SPLIT.value)}))


if __name__ == "__main__":
    cli.run(main)
