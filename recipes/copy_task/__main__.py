"""The long-delay copy task: LSTM keeps what a plain RNN forgets.

Train one model (default: LSTM at delay 100; variants chrono500, smoke):
    python -m recipes.copy_task --workdir=runs/copy_lstm [--config.cell=rnn] [--config.delay=200]
Sweep cells x delays, writing results.csv/.md/.png, accuracy.png, gradient_flow.png:
    python -m recipes.copy_task sweep --workdir=runs/copy_sweep --delays=10,50,100,200 \\
        --cells=lstm,rnn [--config.max_train_minutes=10 ...]
Deployment artifacts (TFLite, ONNX) of a finished LSTM run:
    python -m recipes.copy_task export --workdir=runs/copy_lstm [--format=tflite,onnx]
Predict held-out sequences with an export or a deployed model (symbols and their copies):
    python -m recipes.copy_task predict --model=runs/copy_lstm/deploy/model.tflite
"""

import os

from absl import flags

import configs
from recipes.common import cli, deploy, errors, workdirs

_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write everything "
                               "(default: runs/copy_task/<timestamp>).")
_DELAYS = flags.DEFINE_list("delays", "10,50,100,200", "For `sweep`: the delays T.")
_CELLS = flags.DEFINE_list("cells", "lstm,rnn", "For `sweep`: lstm, rnn, gru, lstm_chrono, "
                           "lstm_peephole, lstm_ln.")
_MODEL = flags.DEFINE_string("model", None, "For `predict`: a SavedModel export "
                             "(WORKDIR/export) or a deployed model file (WORKDIR/deploy/...).")
_FORMAT = flags.DEFINE_list("format", ",".join(deploy.FORMATS),
                            f"For `export`: the formats to write ({', '.join(deploy.FORMATS)}).")
_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(configs.__file__), "copy_task.py"),
    "Config file, optionally with a variant: configs/copy_task.py:smoke.")

COMMANDS = ("sweep", "export", "predict")


def main(argv: list[str]) -> None:
    command = argv[1:]
    if command == ["sweep"]:
        from recipes.copy_task import sweep

        sweep.sweep(_CONFIG.value, _WORKDIR.value or workdirs.default_workdir("copy_task"),
                    _DELAYS.value, _CELLS.value)
    elif command == ["export"]:
        from recipes.copy_task import deploy as copy_deploy

        cli.print_export(copy_deploy.export, _WORKDIR.value, _FORMAT.value)
    elif command == ["predict"]:
        from recipes.copy_task import deploy as copy_deploy

        if not _MODEL.value:
            raise errors.RecipeError("predict needs --model=WORKDIR/export (or a deployed "
                                     "model file)")
        for line in copy_deploy.show_predictions(_MODEL.value, _CONFIG.value):
            print(line)
    elif command:
        raise errors.RecipeError(f"unknown command {' '.join(command)!r} "
                                 f"(known: {', '.join(COMMANDS)})")
    else:
        from recipes.copy_task import train

        train.train_and_evaluate(_CONFIG.value,
                                 _WORKDIR.value or workdirs.default_workdir("copy_task"),
                                 cli.strategy_from_flags())


if __name__ == "__main__":
    cli.run(main)
