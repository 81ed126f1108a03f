"""Token ids → Embedding → stacked lstm_tf.Bidirectional(LSTM) → P(positive); or, with
`config.model="ngrams"`, token ids → a logistic regression on their hashed n-grams (with
`"bilstm_ngrams"`, both: their scores added)."""

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


@keras.saving.register_keras_serializable(package="recipes.sentiment")
class NormalizedEmbedding(keras.layers.Layer):
    """`keras.layers.Embedding` whose table is normalized before the lookup (Miyato et al.
    2017): v̄_k = (v_k − E[v]) / √(Var[v] + 1e-6), E and Var per feature over the rows,
    weighted by the tokens' training frequencies (`frequencies`, uniform until set).

    Adversarial perturbations of a fixed norm then have the same size relative to every
    run's embedding, which cannot grow to make them negligible. `embeddings` is the
    normalized table (what serving folds and deployed models hold); `table` is the trained
    variable.
    """

    def __init__(self, input_dim: int, output_dim: int, mask_zero: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_dim, self.output_dim, self.mask_zero = input_dim, output_dim, mask_zero
        self.supports_masking = mask_zero

    def build(self, input_shape: tuple | None = None) -> None:
        self.table = self.add_weight(shape=(self.input_dim, self.output_dim),
                                     initializer="uniform", name="embeddings")
        self.frequencies = self.add_weight(shape=(self.input_dim,), initializer="ones",
                                           trainable=False, name="frequencies")

    @property
    def embeddings(self) -> Any:
        weights = self.frequencies / ops.sum(self.frequencies)
        mean = ops.sum(weights[:, None] * self.table, axis=0)
        variance = ops.sum(weights[:, None] * ops.square(self.table - mean), axis=0)
        return (self.table - mean) / ops.sqrt(variance + 1e-6)

    def call(self, ids: Any) -> Any:
        return ops.take(self.embeddings, ops.cast(ids, "int32"), axis=0)

    def compute_mask(self, ids: Any, mask: Any = None) -> Any:
        return ops.not_equal(ids, 0) if self.mask_zero else None

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape, self.output_dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "input_dim": self.input_dim,
                "output_dim": self.output_dim, "mask_zero": self.mask_zero}


@keras.saving.register_keras_serializable(package="recipes.sentiment")
class HashedNgrams(keras.layers.Layer):
    """`(batch, time)` token ids, 0 = padding → `(batch, 1)`: a linear score of the n-grams.

    Every run of 1 to `ngrams` consecutive tokens (none of them padding) is hashed to one
    of `buckets` weights (fastText's hashing trick: no n-gram vocabulary); the score is
    the sum of its n-grams' weights divided by the square root of their number, plus a
    bias (0 weights for a text with no tokens). Under a sigmoid: a logistic regression
    on the text's n-gram counts.
    """

    PRIME = 1_000_003

    def __init__(self, ngrams: int = 3, buckets: int = 2**20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ngrams, self.buckets = ngrams, buckets

    def build(self, input_shape: tuple) -> None:
        self.table = self.add_weight(shape=(self.buckets,), initializer="zeros", name="table")
        self.bias = self.add_weight(shape=(1,), initializer="zeros", name="bias")

    def call(self, ids: Any) -> Any:
        ids = ops.cast(ids, "int64")
        time = ops.shape(ids)[1]
        # earlier[k][:, t] = ids[:, t-k], 0 before t=k
        earlier = [ops.pad(ids, [[0, 0], [k, 0]])[:, :time] for k in range(self.ngrams)]
        total = count = 0.0
        for n in range(1, self.ngrams + 1):
            hashed, real = ops.full_like(ids, n), ops.ones_like(ids, dtype="bool")
            for k in range(n - 1, -1, -1):  # the n-gram ending at t: ids[t-n+1], ..., ids[t]
                hashed = (hashed * self.PRIME + earlier[k]) % self.buckets
                real = ops.logical_and(real, earlier[k] > 0)
            weights = ops.cast(real, self.table.dtype)
            total = total + ops.sum(ops.take(self.table, hashed) * weights, axis=1)
            count = count + ops.sum(weights, axis=1)
        return (total / ops.sqrt(ops.maximum(count, 1.0)))[:, None] + self.bias

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "ngrams": self.ngrams, "buckets": self.buckets}


def create_model(config: Any, batch_size: int | None = None,
                 mask_zero: bool = True) -> keras.Model:
    """`(batch, time)` int ids, 0 = padding → `(batch, 1)` P(positive).

    `batch_size`: a fixed batch size (TFLite); `mask_zero=False`: the same model
    without a padding mask, for unpadded sequences (TFLite's fused LSTM op).
    `config.model="ngrams"`: `HashedNgrams` under a sigmoid, no embedding or LSTM;
    `"bilstm_ngrams"`: the Bi-LSTM's score (before its sigmoid) plus `HashedNgrams`'.
    """
    tokens = keras.Input(batch_shape=(batch_size, None), dtype="int64", name="tokens")
    if config.model == "ngrams":
        score = HashedNgrams(config.bag_ngrams, config.bag_buckets, name="ngrams")(tokens)
        probability = keras.layers.Activation("sigmoid", name="probability")(score)
        return keras.Model(tokens, probability, name="sentiment_ngrams")
    embedding = NormalizedEmbedding if config.normalize_embeddings else keras.layers.Embedding
    x = embedding(config.vocab_size, config.embedding_dim, mask_zero=mask_zero)(tokens)
    # Word dropout: drops whole token vectors (one draw per token, all features).
    x = keras.layers.Dropout(config.word_dropout, noise_shape=(None, None, 1))(x)
    x = keras.layers.Dropout(config.dropout)(x)
    for _ in range(config.num_layers):
        x = lstm_tf.Bidirectional(lstm_tf.LSTM(
            config.lstm_units, return_sequences=True, dropout=config.lstm_dropout))(x)
    x = MaskedMeanMaxPooling()(x)
    x = keras.layers.Dropout(config.dropout)(x)
    if config.model == "bilstm_ngrams":  # the Bi-LSTM's score plus the n-grams'
        score = keras.layers.Add(name="score")([
            keras.layers.Dense(1, name="bilstm_score")(x),
            HashedNgrams(config.bag_ngrams, config.bag_buckets, name="ngrams")(tokens)])
        probability = keras.layers.Activation("sigmoid", name="probability",
                                              dtype="float32")(score)
        return keras.Model(tokens, probability, name="sentiment_bilstm_ngrams")
    # (In float32 under a mixed precision policy too: the loss is taken on it.)
    probability = keras.layers.Dense(1, activation="sigmoid", name="probability",
                                     dtype="float32")(x)
    return keras.Model(tokens, probability, name="sentiment_bilstm")


def first_layers(model: keras.Model) -> tuple[keras.layers.Embedding | NormalizedEmbedding,
                                              lstm_tf.Bidirectional]:
    """`create_model`'s embedding and its first Bi-LSTM layer."""
    embedding = embedding_layer(model)
    bidirectional = next(layer for layer in model.layers
                         if isinstance(layer, lstm_tf.Bidirectional))
    return embedding, bidirectional


def embedding_layer(model: keras.Model) -> keras.layers.Embedding | NormalizedEmbedding:
    """`model`'s (first) embedding layer."""
    return next(layer for layer in model.layers
                if isinstance(layer, (keras.layers.Embedding, NormalizedEmbedding)))


def embedding_table(layer: keras.layers.Embedding | NormalizedEmbedding) -> keras.Variable:
    """The trained variable of an embedding layer (for `NormalizedEmbedding`: before its
    normalization)."""
    return layer.table if isinstance(layer, NormalizedEmbedding) else layer.embeddings
