"""The language model's network, and a finished run's: shared by the recipe that trains it
(`recipes.language_model`) and the one that starts from it (`recipes.sentiment.pretrained`).

Token ids → Embedding → stacked lstm_tf.LSTM → logits over the vocabulary (Zaremba et al.).
Two models with the same weights (`stateless.set_weights(stateful.get_weights())`):
- the training model, `create_model(config, vocab_size, batch_size=B)`: `[B, time]` ids →
  `[B, time, vocab]` logits, stateful LSTMs (batch k+1 starts from batch k's state);
- the step model, `create_step_model(config, vocab_size)` (or `create_model` without a batch
  size): ids, a mask and the LSTM states in, logits and the new states out. Scoring,
  generation, the export and the deployed models use it.

`finished_run(workdir)` reads a finished run's config and vocabulary, and
`trained_step_model(...)` its step model with the best weights.
"""

from __future__ import annotations

import pathlib
from typing import Any

import keras
import ml_collections

import lstm_tf
from recipes.common import checkpoints, deploy, workdirs


def create_model(config: Any, vocab_size: int, batch_size: int | None = None) -> keras.Model:
    """The stateful training model (with `batch_size`) or the step model (without).

    Training model: `[batch_size, time]` ids → `[batch_size, time, vocab]` logits,
    stateful LSTMs. The step model: see `create_step_model`.
    """
    if batch_size is None:
        return create_step_model(config, vocab_size)
    tokens = keras.Input(batch_shape=(batch_size, None), dtype="int32", name="tokens")
    x = keras.layers.Dropout(config.dropout)(_embedding(config, vocab_size)(tokens))
    for i in range(config.num_layers):
        x = _lstm(config, i, return_state=False, stateful=True)(x)
        x = keras.layers.Dropout(config.dropout)(x)
    return keras.Model(tokens, _logits(config, vocab_size)(x), name="language_model")


def create_step_model(config: Any, vocab_size: int, batch_size: int | None = None,
                      steps: int | None = None, masked: bool = True) -> keras.Model:
    """The LM as a function of ids and states: what scoring, generation and deployment run.

    Inputs: `tokens` int32 `[batch, time]`, `mask` bool `[batch, time]` (right
    padding; not with `masked=False`), then `h0, c0, h1, c1, ...` `[batch,
    units]`; outputs: `logits` `[batch, time, vocab]`, then the final `h, c` of
    each layer (at each row's last real step). `batch_size`, `steps`: fixed
    sizes (TFLite: `steps=1` streams one token at a time).
    """
    tokens = keras.Input(batch_shape=(batch_size, steps), dtype="int32", name="tokens")
    mask = keras.Input(batch_shape=(batch_size, steps), dtype="bool", name="mask")
    states = [keras.Input(batch_shape=(batch_size, config.units), name=f"{k}{i}")
              for i in range(config.num_layers) for k in "hc"]
    x = keras.layers.Dropout(config.dropout)(_embedding(config, vocab_size)(tokens))
    new_states = []
    for i in range(config.num_layers):
        x, h, c = _lstm(config, i, return_state=True, stateful=False)(
            x, initial_state=states[2 * i:2 * i + 2], mask=mask if masked else None)
        new_states += [h, c]
        x = keras.layers.Dropout(config.dropout)(x)
    logits = _logits(config, vocab_size)(x)
    inputs = [tokens, mask, *states] if masked else [tokens, *states]
    return keras.Model(inputs, [logits, *new_states], name="language_model_step")


def _init(config: Any) -> keras.initializers.Initializer:
    return keras.initializers.RandomUniform(-config.init_scale, config.init_scale)


def _embedding(config: Any, vocab_size: int) -> keras.layers.Layer:
    return keras.layers.Embedding(vocab_size, config.embedding_dim,
                                  embeddings_initializer=_init(config), name="embedding")


def _lstm(config: Any, i: int, return_state: bool, stateful: bool) -> keras.layers.Layer:
    return lstm_tf.LSTM(config.units, return_sequences=True, return_state=return_state,
                        stateful=stateful, kernel_initializer=_init(config),
                        recurrent_initializer=_init(config), name=f"lstm{i}")


def _logits(config: Any, vocab_size: int) -> keras.layers.Layer:
    return keras.layers.Dense(vocab_size, kernel_initializer=_init(config), name="logits")


def reset_states(model: keras.Model) -> None:
    """Zeroes the carried state of every stateful LSTM in `model`."""
    for layer in model.layers:
        if isinstance(layer, lstm_tf.LSTM) and layer.stateful:
            layer.reset_state()


def finished_run(workdir: str) -> tuple[pathlib.Path, Any, list[str]]:
    """A workdir with a trained language model, its config and its vocabulary."""
    path = deploy.finished_workdir(workdir, "language model", "vocab.json")
    config = ml_collections.ConfigDict(workdirs.read_json(path / "config.json"))
    return path, config, workdirs.read_json(path / "vocab.json")


def trained_step_model(config: Any, vocab: list[str], path: pathlib.Path,
                       **kwargs: Any) -> keras.Model:
    """`create_step_model(config, len(vocab) + 1, **kwargs)` with the run's best weights."""
    training = create_model(config, len(vocab) + 1, batch_size=config.batch_size)
    training.load_weights(checkpoints.best_checkpoint(path))
    model = create_step_model(config, len(vocab) + 1, **kwargs)
    model.set_weights(training.get_weights())
    return model
