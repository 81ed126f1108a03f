"""The long-delay copy task (recipes.copy_task).

Default: LSTM(128) at delay T=100, with a curriculum over delays from T=10:
    python -m recipes.copy_task --workdir=runs/copy_lstm_T100
should copy 99.9 % of the held-out symbols (it stops there: `stop_accuracy`).
Variants (`--config=configs/copy_task.py:VARIANT`):
- `chrono500`, `chrono1000`, `chrono2000`: chrono-initialized LSTM at T=500, 1000, 2000
  (curriculum from T=10; the longer ones train for up to 10 h, resuming when rerun), to
  99.9 %, 99 % and 99 % of the symbols (docs/recipes/copy_task.md).
- `smoke`: a tiny run for tests (seconds).
Cells: `--config.cell=lstm|lstm_peephole|lstm_ln|rnn|gru` (lstm_tf.LSTM, with peepholes, with
layer norm; rnn = keras.layers.SimpleRNN, gru = keras.layers.GRU);
`--config.chrono=True` for chrono initialization of the LSTM (Tallec & Ollivier, 2018).
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("default", "chrono500", "chrono1000", "chrono2000", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/copy_task.py "
                         f"(known: {', '.join(VARIANTS)})")
    config = ml_collections.ConfigDict()
    # Task: copy_length symbols out of num_symbols, recalled `delay` steps later.
    config.delay = 100
    config.copy_length = 10
    config.num_symbols = 8
    # Model: one-hot -> recurrent layer -> Dense over blank/symbols/delimiter.
    config.cell = "lstm"  # "lstm", "lstm_peephole", "lstm_ln" (lstm_tf.LSTM), "rnn", "gru"
    config.chrono = False  # LSTM only: chrono initialization of the gate biases
    config.chrono_max_delay = 0  # T_max of chrono; 0: 3/2 x (delay + 2 x copy_length)
    config.units = 128
    # Training. An "epoch" is steps_per_epoch batches of fresh sequences.
    config.batch_size = 64
    config.optimizer = "adam"  # "adam" or "rmsprop"
    config.learning_rate = 1e-3
    config.clipnorm = 1.0
    config.steps_per_epoch = 200
    config.max_epochs = 1000
    config.max_train_minutes = 60.0  # stop after this much training (0: no limit)
    config.stop_accuracy = 0.999  # stop once the held-out accuracy at `delay` reaches it
    # Curriculum: train at curriculum_start first; multiply the delay by curriculum_growth
    # (up to `delay`) whenever an epoch's copied-symbol accuracy reaches curriculum_threshold.
    # Once the LSTM can copy at T=10, the longer delays take a few epochs each.
    config.curriculum_start = 10  # 0: no curriculum, train at `delay` from the start
    config.curriculum_growth = 2.0
    config.curriculum_threshold = 0.99
    # Evaluation: a fixed held-out set at `delay`; diagnostics on its first examples.
    config.eval_size = 1000
    config.eval_seed = 1234
    config.diagnostic_examples = 32
    config.log_every_steps = 50  # TensorBoard step scalars (0: off)
    config.seed = 0

    if variant.startswith("chrono"):
        config.delay = int(variant.removeprefix("chrono"))
        config.chrono = True
        if config.delay > 500:
            config.max_train_minutes = 600.0
            config.stop_accuracy = 0.99  # an epoch at these delays is long: 99 % counts as solved
    elif variant == "smoke":
        config.log_every_steps = 5
        config.delay = 10
        config.units = 16
        config.steps_per_epoch = 10
        config.max_epochs = 2
        config.curriculum_start = 5
        config.curriculum_threshold = 0.0  # grow every epoch
        config.eval_size = 64
        config.diagnostic_examples = 4
    return config
