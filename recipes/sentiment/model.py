"""Token ids → Embedding → stacked lstm_tf.Bidirectional(LSTM) → P(positive)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

import lstm_tf


@keras.saving.register_keras_serializable(package="recipes.sentiment")
class MaskedMeanMaxPooling(keras.layers.Layer):
    """`(batch, time, features)` → `(batch, 2*features)`: mean and max over real steps.

    Sequences with no real step pool to zeros.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x: Any, mask: Any = None) -> Any:
        if mask is None:
            mask = ops.ones(ops.shape(x)[:2], dtype="bool")
        keep = ops.expand_dims(ops.cast(mask, "bool"), -1)
        weights = ops.cast(keep, x.dtype)
        count = ops.sum(weights, axis=1)
        mean = ops.sum(x * weights, axis=1) / ops.maximum(count, 1.0)
        peak = ops.max(ops.where(keep, x, -1e9), axis=1)
        peak = ops.where(count > 0, peak, 0.0)
        return ops.concatenate([mean, peak], axis=-1)

    def compute_mask(self, x: Any, mask: Any = None) -> None:
        return None

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], 2 * input_shape[-1])


def create_model(config: Any, batch_size: int | None = None,
                 mask_zero: bool = True) -> keras.Model:
    """`(batch, time)` int ids, 0 = padding → `(batch, 1)` P(positive).

    `batch_size`: a fixed batch size (TFLite); `mask_zero=False`: the same model
    without a padding mask, for unpadded sequences (TFLite's fused LSTM op).
    """
    tokens = keras.Input(batch_shape=(batch_size, None), dtype="int64", name="tokens")
    x = keras.layers.Embedding(config.vocab_size, config.embedding_dim,
                               mask_zero=mask_zero)(tokens)
    # Word dropout: drops whole token vectors (one draw per token, all features).
    x = keras.layers.Dropout(config.word_dropout, noise_shape=(None, None, 1))(x)
    x = keras.layers.Dropout(config.dropout)(x)
    for _ in range(config.num_layers):
        x = lstm_tf.Bidirectional(lstm_tf.LSTM(
            config.lstm_units, return_sequences=True, dropout=config.lstm_dropout))(x)
    x = MaskedMeanMaxPooling()(x)
    x = keras.layers.Dropout(config.dropout)(x)
    probability = keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model(tokens, probability, name="sentiment_bilstm")


def first_layers(model: keras.Model) -> tuple[keras.layers.Embedding, lstm_tf.Bidirectional]:
    """`create_model`'s embedding and its first Bi-LSTM layer."""
    embedding = next(layer for layer in model.layers
                     if isinstance(layer, keras.layers.Embedding))
    bidirectional = next(layer for layer in model.layers
                         if isinstance(layer, lstm_tf.Bidirectional))
    return embedding, bidirectional
