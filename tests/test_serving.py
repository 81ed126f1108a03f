"""The sentiment export's fast inference (`recipes.sentiment.serving`) and the loop under it
(`lstm_tf.fused.pooled_inference`).

References: the same architecture built from `keras.layers` (Embedding with `mask_zero`,
`Bidirectional(LSTM)`, the recipe's pooling and head) with the same weights, on rows
right-padded (the fast path), empty, or padded first or inside (the model itself); the LSTM
equations in NumPy.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import sentiment as sentiment_config
from recipes.sentiment import model as models
from recipes.sentiment import serving

IDS = np.array([
    [5, 9, 31, 7, 0, 0, 0, 0],  # right-padded
    [12, 4, 8, 15, 16, 23, 42, 3],  # no padding
    [0, 0, 0, 0, 0, 0, 0, 0],  # no tokens
    [0, 0, 6, 6, 2, 0, 0, 0],  # padding first (not what the tokenizer makes)
    [3, 0, 0, 11, 0, 19, 0, 2],  # padding inside
], np.int64)


def _keras_reference(config, weights: list) -> keras.Model:
    tokens = keras.Input((None,), dtype="int64")
    x = keras.layers.Embedding(config.vocab_size, config.embedding_dim, mask_zero=True)(tokens)
    x = keras.layers.Bidirectional(keras.layers.LSTM(config.lstm_units,
                                                     return_sequences=True))(x)
    score = keras.layers.Dense(1)(models.MaskedMeanMaxPooling()(x))
    if config.model == "bilstm_ngrams":
        score = score + models.HashedNgrams(config.bag_ngrams, config.bag_buckets)(tokens)
    model = keras.Model(tokens, keras.activations.sigmoid(score))
    model.set_weights(weights)
    return model


@pytest.mark.parametrize("kind,fold", [("bilstm", True), ("bilstm_ngrams", True),
                                       ("bilstm", False)])
def test_fast_inference_computes_what_the_model_computes(kind, fold):
    config = sentiment_config.get_config("smoke")
    config.model, config.bag_buckets, config.fold_embedding = kind, 512, fold
    model = models.create_model(config)
    rng = np.random.default_rng(0)
    # Large enough weights that the gates and the n-grams matter.
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32")
                       for w in model.get_weights()])
    probability = tf.function(serving.probability_function(model, config))
    expected = _keras_reference(config, model.get_weights())(IDS).numpy()[:, 0]
    assert expected.std() > 0.05  # the rows differ
    np.testing.assert_allclose(probability(tf.constant(IDS)).numpy(), expected, atol=1e-6)
    # Right-padded rows only (the fast path; the batch above has rows that are not), and a
    # row alone at its length.
    np.testing.assert_allclose(probability(tf.constant(IDS[:3])).numpy(), expected[:3],
                               atol=1e-6)
    np.testing.assert_allclose(probability(tf.constant(IDS[:1, :4])).numpy(), expected[:1],
                               atol=1e-6)
    # The fast path is there, not only the model (for ids not right-padded): a loop more than
    # the model's graph has, and with `fold_embedding` the folded tables.
    def loops(function) -> int:
        traced = function.get_concrete_function(tf.TensorSpec([None, None], tf.int64))
        return sum(f.signature.name.startswith("while_body")
                   for f in traced.graph.as_graph_def().library.function)

    assert loops(probability) > loops(tf.function(lambda ids: model(ids)))
    traced = probability.get_concrete_function(tf.TensorSpec([None, None], tf.int64))
    tables = [v for v in traced.variables if "input_projections" in v.name]
    assert [tuple(t.shape) for t in tables] == [(config.vocab_size, 4 * config.lstm_units)] * (
        2 if fold else 0)


def test_pooled_inference_against_numpy():
    """Σ h_t and max h_t over each sequence's real steps (the first `lengths`, the steps
    after them run but not counted): the LSTM equations in NumPy."""
    from lstm_tf import fused

    rng = np.random.default_rng(1)
    steps, batch, units = 7, 4, 4
    xw = rng.normal(0, 1, (steps, batch, 4 * units)).astype("float32")
    recurrent = rng.normal(0, 0.5, (units, 4 * units)).astype("float32")
    lengths = np.array([7, 3, 0, 5], np.int32)  # 0: no real steps, total 0 and peak -inf

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    total, peak = fused.pooled_inference(tf.constant(xw), tf.constant(lengths),
                                         tf.constant(recurrent))
    h, c = np.zeros((batch, units)), np.zeros((batch, units))
    want_total, want_peak = np.zeros((batch, units)), np.full((batch, units), -np.inf)
    for t in range(steps):
        i, f, g, o = np.split(xw[t] + h @ recurrent, 4, axis=1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        real = (t < lengths)[:, None]
        want_total += np.where(real, h, 0)
        want_peak = np.where(real, np.maximum(want_peak, h), want_peak)
    np.testing.assert_allclose(total.numpy(), want_total, atol=1e-5)
    np.testing.assert_allclose(peak.numpy(), want_peak, atol=1e-6)
