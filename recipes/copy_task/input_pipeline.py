"""Copy-task sequences, generated on the fly from a seed (no files).

Tokens: 0 = blank, 1..num_symbols = symbols, num_symbols + 1 = delimiter.
An input of length delay + 2 * copy_length is `copy_length` symbols, delay - 1
blanks, the delimiter, then copy_length blanks; the target is blank everywhere
except the last copy_length steps, which repeat the symbols.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

BLANK = 0


def vocab_size(config: Any) -> int:
    return config.num_symbols + 2


def baseline_loss(delay: int, copy_length: int = 10, num_symbols: int = 8) -> float:
    """Cross-entropy per step of the memoryless strategy: blanks, then uniform guesses.

    `copy_length * ln(num_symbols) / (delay + 2 * copy_length)`: 0.173 at delay 100.
    """
    return copy_length * math.log(num_symbols) / (delay + 2 * copy_length)


def make_batch(symbols: tf.Tensor, delay: tf.Tensor, num_symbols: int
               ) -> tuple[tf.Tensor, tf.Tensor]:
    """`symbols` int32 `[batch, copy_length]` in 1..num_symbols → (inputs, targets).

    Both int32 `[batch, delay + 2 * copy_length]`.
    """
    batch, copy_length = tf.shape(symbols)[0], tf.shape(symbols)[1]
    delimiter = tf.fill([batch, 1], num_symbols + 1)
    inputs = tf.concat([symbols, tf.zeros([batch, delay - 1], tf.int32), delimiter,
                        tf.zeros([batch, copy_length], tf.int32)], axis=1)
    targets = tf.concat([tf.zeros([batch, delay + copy_length], tf.int32), symbols], axis=1)
    return inputs, targets


def training_symbols(config: Any, first_batch: int = 0) -> tf.data.Dataset:
    """Endless `[batch, copy_length]` symbol batches k = first_batch, ...: functions of (seed, k).

    The training step lays them out at the curriculum's current delay
    (`model.CopyModel`): a delay read here would be read ahead of time, by the
    prefetching, before the curriculum changes it at the end of an epoch.
    """
    def symbols(k: tf.Tensor) -> tf.Tensor:
        return tf.random.stateless_uniform(
            [config.batch_size, config.copy_length], seed=tf.stack([config.seed, k]),
            minval=1, maxval=config.num_symbols + 1, dtype=tf.int32)

    batches = tf.data.Dataset.counter(start=first_batch)
    return batches.map(lambda k: symbols(tf.cast(k, tf.int32))).prefetch(2)


def held_out(config: Any) -> tuple[np.ndarray, np.ndarray]:
    """The fixed evaluation set: `eval_size` sequences at `config.delay`, from `eval_seed`."""
    rng = np.random.default_rng(config.eval_seed)
    symbols = rng.integers(1, config.num_symbols + 1, (config.eval_size, config.copy_length))
    inputs, targets = make_batch(tf.constant(symbols, tf.int32), config.delay,
                                 config.num_symbols)
    return inputs.numpy(), targets.numpy()
