"""Token ids → Embedding → stacked lstm_tf.LSTM → logits over the vocabulary (Zaremba et al.).

Two models with the same weights (`stateless.set_weights(stateful.get_weights())`):
- the training model, `create_model(config, vocab_size, batch_size=B)`: `[B, time]` ids →
  `[B, time, vocab]` logits, stateful LSTMs (batch k+1 starts from batch k's state);
- the step model, `create_model(config, vocab_size)`: ids, a mask and the LSTM states in,
  logits and the new states out. Scoring, generation and the export use it.
"""

from __future__ import annotations

from typing import Any

import keras

import lstm_tf


def create_model(config: Any, vocab_size: int, batch_size: int | None = None) -> keras.Model:
    """The stateful training model (with `batch_size`) or the step model (without).

    Step model inputs: `tokens` int32 `[batch, time]`, `mask` bool `[batch, time]`
    (right padding), then `h, c` `[batch, units]` of each layer; outputs: logits
    `[batch, time, vocab]`, then the final `h, c` of each layer (at each row's
    last real step).
    """
    init = keras.initializers.RandomUniform(-config.init_scale, config.init_scale)
    stateful = batch_size is not None
    tokens = keras.Input(batch_shape=(batch_size, None), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, config.embedding_dim,
                               embeddings_initializer=init, name="embedding")(tokens)
    x = keras.layers.Dropout(config.dropout)(x)
    if not stateful:
        mask = keras.Input((None,), dtype="bool", name="mask")
        states = [keras.Input((config.units,), name=f"{k}{i}")
                  for i in range(config.num_layers) for k in "hc"]
    new_states = []
    for i in range(config.num_layers):
        lstm = lstm_tf.LSTM(config.units, return_sequences=True, return_state=not stateful,
                            stateful=stateful, kernel_initializer=init,
                            recurrent_initializer=init, name=f"lstm{i}")
        if stateful:
            x = lstm(x)
        else:
            x, h, c = lstm(x, initial_state=states[2 * i:2 * i + 2], mask=mask)
            new_states += [h, c]
        x = keras.layers.Dropout(config.dropout)(x)
    logits = keras.layers.Dense(vocab_size, kernel_initializer=init, name="logits")(x)
    if stateful:
        return keras.Model(tokens, logits, name="language_model")
    return keras.Model([tokens, mask, *states], [logits, *new_states],
                       name="language_model_step")


def reset_states(model: keras.Model) -> None:
    """Zeroes the carried state of every stateful LSTM in `model`."""
    for layer in model.layers:
        if isinstance(layer, lstm_tf.LSTM) and layer.stateful:
            layer.reset_state()
