"""Token ids → one-hot → one recurrent layer (LSTM, SimpleRNN or GRU) → logits per step."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

import lstm_tf
from recipes.copy_task import input_pipeline

# The LSTM cells of `config.cell`: lstm_tf.LSTM with these arguments.
LSTM_VARIANTS = {"lstm": {}, "lstm_peephole": {"use_peepholes": True},
                 "lstm_ln": {"layer_norm": True}}


def chrono_max_delay(config: Any) -> int:
    """T_max of chrono initialization: the config's, else 3/2 of the sequence length."""
    return config.chrono_max_delay or int(1.5 * (config.delay + 2 * config.copy_length))


def create_model(config: Any, batch_size: int | None = None) -> keras.Model:
    """`(batch, time)` int32 tokens → `(batch, time, vocab)` logits (`batch_size`: fixed).

    Layers are named `embedding`, `rnn` and `logits` (the diagnostics use them).
    The model also holds `curriculum_delay` (int32), the delay the curriculum is
    training at, so checkpoints and backups restore it.
    """
    vocab = input_pipeline.vocab_size(config)
    tokens = keras.Input(batch_shape=(batch_size, None), dtype="int32", name="inputs")
    # One-hot inputs (a trainable embedding that starts as the identity): Keras's default
    # U[-0.05, 0.05] embedding made the symbols too faint, and the LSTM stayed at the baseline.
    x = keras.layers.Embedding(vocab, vocab, embeddings_initializer="identity",
                               name="embedding")(tokens)
    if config.cell.startswith("lstm"):
        chrono = {"chrono_max_delay": chrono_max_delay(config)} if config.chrono else {}
        variant = LSTM_VARIANTS[config.cell]
        rnn = lstm_tf.LSTM(config.units, return_sequences=True, name="rnn", **chrono, **variant)
    else:
        layer = {"rnn": keras.layers.SimpleRNN, "gru": keras.layers.GRU}[config.cell]
        rnn = layer(config.units, return_sequences=True, name="rnn")
    logits = keras.layers.Dense(vocab, name="logits")(rnn(x))
    model = CopyModel(tokens, logits, name=f"copy_{config.cell}")
    model.num_symbols = config.num_symbols
    model.curriculum_delay = keras.Variable(0, dtype="int32", trainable=False,
                                            name="curriculum_delay")
    return model


class CopyModel(keras.Model):
    """The copy model (functional), trained on symbol batches it lays out itself.

    `fit` feeds it `[batch, copy_length]` symbols (`input_pipeline.training_symbols`);
    each training step builds inputs and targets at `curriculum_delay` as it is
    when the step runs, so a change of the curriculum applies from the next step
    on. Evaluation takes ready `(inputs, targets)`.
    """

    def train_step(self, data: Any) -> Any:
        symbols, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        inputs, targets = input_pipeline.make_batch(
            symbols, tf.convert_to_tensor(self.curriculum_delay), self.num_symbols)
        return super().train_step((inputs, targets))


def copied_accuracy(copy_length: int) -> Any:
    """Keras metric: accuracy over the last `copy_length` steps (the copied symbols)."""

    def copied_accuracy(targets: Any, logits: Any) -> Any:
        predictions = keras.ops.argmax(logits[:, -copy_length:], axis=-1)
        return keras.ops.mean(keras.ops.cast(
            predictions == keras.ops.cast(targets[:, -copy_length:], predictions.dtype),
            "float32"), axis=-1)

    return copied_accuracy
