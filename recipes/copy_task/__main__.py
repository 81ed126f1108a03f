"""The long-delay copy task: LSTM keeps what a plain RNN forgets.

Train one model (default: LSTM at delay 100; variants chrono500, smoke):
    python -m recipes.copy_task --workdir=runs/copy_lstm [--config.cell=rnn] [--config.delay=200]
Sweep cells x delays, writing results.csv/.md/.png, accuracy.png, gradient_flow.png:
    python -m recipes.copy_task sweep --workdir=runs/copy_sweep --delays=10,50,100,200 \\
        --cells=lstm,rnn [--config.max_train_minutes=10 ...]
Predict with an export (prints the copied symbols of one generated sequence):
    see README: serving_default takes `inputs` int32 [batch, delay + 20].
"""

import os

from absl import flags

import configs
from lstm_tf import recipe

_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write everything "
                               "(default: runs/copy_task/<timestamp>).")
_DELAYS = flags.DEFINE_list("delays", "10,50,100,200", "For `sweep`: the delays T.")
_CELLS = flags.DEFINE_list("cells", "lstm,rnn", "For `sweep`: lstm, rnn, gru, lstm_chrono.")
_CONFIG = recipe.define_config(
    "config", os.path.join(os.path.dirname(configs.__file__), "copy_task.py"),
    "Config file, optionally with a variant: configs/copy_task.py:smoke.")


def main(argv: list[str]) -> None:
    command = argv[1:]
    workdir = _WORKDIR.value or recipe.default_workdir("copy_task")
    if command == ["sweep"]:
        from recipes.copy_task import sweep

        sweep.sweep(_CONFIG.value, workdir, _DELAYS.value, _CELLS.value)
        return
    if command:
        raise recipe.RecipeError(f"unknown command {' '.join(command)!r} (known: sweep)")
    from recipes.copy_task import train

    train.train_and_evaluate(_CONFIG.value, workdir, recipe.strategy_from_flags())


if __name__ == "__main__":
    recipe.run(main)
