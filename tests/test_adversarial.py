"""Adversarial and virtual adversarial training (recipes/sentiment/adversarial.py) and the
normalized embedding, against references computed apart: the loss gradient by hand with
`tf.GradientTape` on the layers called one by one, the power iteration and the KL divergence
in NumPy; then end to end on the smoke configs (words with unlabelled text, characters)."""

import json

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

import lstm_tf
from configs import sentiment as sentiment_config
from recipes.common.errors import RecipeError
from recipes.sentiment import adversarial, input_pipeline, pretrained, train
from recipes.sentiment import model as models

TOKENS = np.array([[3, 4, 5, 6, 0, 0], [7, 8, 0, 0, 0, 0], [9, 2, 4, 11, 12, 1]], np.int64)
LABELS = np.array([1, 0, 1], np.int64)
MASK = TOKENS != 0


def _model(body: str) -> keras.Model:
    """Tokens → Embedding(mask_zero) → `body` → P(positive)."""
    keras.utils.set_random_seed(1)
    tokens = keras.Input((None,), dtype="int64")
    x = keras.layers.Embedding(16, 4, mask_zero=True)(tokens)
    x = lstm_tf.LSTM(3)(x) if body == "lstm" else keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(tokens, keras.layers.Dense(1, activation="sigmoid")(x))
    model.layers[1].embeddings.assign(np.random.default_rng(0).normal(size=(16, 4)))
    return model


def _trainer(model: keras.Model, **kwargs) -> adversarial.AdversarialTraining:
    trainer = adversarial.AdversarialTraining(model, **kwargs)
    trainer.compile(optimizer="adam", loss="binary_crossentropy")
    return trainer


def _unit(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x over its L2 norm per sequence, over the real steps only."""
    x = x * mask[..., None]
    return x / np.sqrt((x**2).sum(axis=(1, 2), keepdims=True))


def _cross_entropy(labels: np.ndarray, p: np.ndarray) -> float:
    p = p.reshape(-1)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def test_adversarial_perturbation_is_epsilon_times_the_normalized_gradient():
    model = _model("lstm")
    embedding, lstm, dense = model.layers[1:]

    def forward(x):  # the layers one by one, the mask passed by hand
        return dense(lstm(x, mask=tf.constant(MASK)))

    x = tf.constant(embedding(TOKENS))
    with tf.GradientTape() as tape:
        tape.watch(x)
        p = forward(x)
        loss = tf.reduce_mean(keras.losses.binary_crossentropy(LABELS[:, None], p))
    g = tape.gradient(loss, x).numpy()
    expected = 0.5 * _unit(g, MASK)

    out, _ = _trainer(model, adversarial_epsilon=0.5).adversarial_losses(
        tf.constant(TOKENS), tf.constant(LABELS), training=False)
    r = out["adversarial_r"].numpy()
    np.testing.assert_allclose(r, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(r[~MASK], 0.0)  # nothing at padding
    np.testing.assert_allclose(np.linalg.norm(r.reshape(3, -1), axis=1), 0.5, rtol=1e-5)
    perturbed = forward(x + expected).numpy()
    assert float(out["adversarial_loss"]) == pytest.approx(_cross_entropy(LABELS, perturbed),
                                                           rel=1e-5)
    assert float(out["loss"]) == pytest.approx(_cross_entropy(LABELS, p.numpy()), rel=1e-5)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _kl(p, q):
    return float(np.mean(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))))


@pytest.mark.parametrize("with_unlabeled", [False, True])
def test_virtual_adversarial_loss_is_the_kl_after_one_power_iteration(with_unlabeled):
    """On p = σ(w · mean of the real steps' embeddings + b), whose gradients are known:
    ∂KL(p ‖ σ(z))/∂z = σ(z) − p."""
    model = _model("mean")
    table = model.layers[1].embeddings.numpy()
    w, b = (v.numpy() for v in model.layers[-1].weights)
    unlabeled = np.array([[5, 5, 13, 14, 15, 2, 3, 0], [6, 0, 0, 0, 0, 0, 0, 0]], np.int64)
    tokens = TOKENS
    if with_unlabeled:  # the batch the loss is on: both, padded to one length
        tokens = np.zeros((5, 8), np.int64)
        tokens[:3, :6], tokens[3:] = TOKENS, unlabeled
    mask = tokens != 0
    direction = np.random.default_rng(1).normal(size=(*tokens.shape, 4))

    count = mask.sum(1, keepdims=True)
    e = table[tokens]

    def z(x):
        return ((x * mask[..., None]).sum(1) / count) @ w[:, 0] + b[0]

    p = _sigmoid(z(e))
    d = 0.1 * _unit(direction, mask)
    g = (_sigmoid(z(e + d)) - p)[:, None, None] * mask[..., None] * w[:, 0] / count[..., None]
    r = 0.7 * _unit(g, mask)
    expected = _kl(p, _sigmoid(z(e + r)))

    out, _ = _trainer(model, virtual_adversarial_epsilon=0.7, xi=0.1).adversarial_losses(
        tf.constant(TOKENS), tf.constant(LABELS),
        tf.constant(unlabeled) if with_unlabeled else None, training=False,
        direction=tf.constant(direction, tf.float32))
    np.testing.assert_allclose(out["virtual_adversarial_r"].numpy(), r, rtol=1e-3, atol=1e-6)
    assert float(out["virtual_adversarial_loss"]) == pytest.approx(expected, rel=1e-3)
    assert expected > 1e-4  # (the test means something)


def test_zero_epsilon_perturbs_nothing_and_trains_as_the_plain_model():
    direction = tf.random.normal([3, 6, 4], seed=0)
    g = tf.random.normal([3, 6, 4], seed=1)
    assert not np.any(adversarial.adversarial_perturbation(g, MASK, 0.0).numpy())
    model = _model("mean")

    def probability_of(x):
        return model.layers[-1](keras.layers.GlobalAveragePooling1D()(x, mask=MASK))

    x = model.layers[1](TOKENS)
    r = adversarial.virtual_adversarial_perturbation(probability_of, x, MASK,
                                                     probability_of(x), 0.0, 0.1, direction)
    assert not np.any(r.numpy())
    assert float(adversarial.divergence(probability_of(x), probability_of(x + r))) == 0.0

    plain, other = _model("lstm"), _model("lstm")
    other.set_weights(plain.get_weights())
    plain.compile(optimizer="adam", loss="binary_crossentropy")
    trainer = _trainer(other, adversarial_epsilon=0.0, virtual_adversarial_epsilon=0.0)
    for _ in range(3):
        expected = plain.train_on_batch(TOKENS, LABELS, return_dict=True)
        logs = trainer.train_on_batch(TOKENS, LABELS, return_dict=True)
    assert logs["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert logs.keys() == expected.keys()
    for a, b in zip(plain.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_normalized_embedding_is_the_frequency_weighted_standardization():
    layer = models.NormalizedEmbedding(6, 3, mask_zero=True)
    layer.build()
    table = np.random.default_rng(2).normal(2.0, 3.0, size=(6, 3))
    counts = np.array([0, 5, 1, 0, 2, 12], np.float32)
    layer.table.assign(table)
    layer.frequencies.assign(counts)
    weights = counts / counts.sum()
    mean = weights @ table
    expected = (table - mean) / np.sqrt(weights @ (table - mean) ** 2 + 1e-6)
    np.testing.assert_allclose(layer(np.array([[5, 1, 0]])).numpy()[0],
                               expected[[5, 1, 0]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.compute_mask(np.array([[5, 1, 0]])), [[True, True,
                                                                                 False]])
    # Started from a language model, the LSTM computes from the normalized rows what it
    # computed from the raw ones.
    cell = lstm_tf.LSTM(2)
    cell.build((None, None, 3))
    before = table @ cell.cell.kernel.numpy() + cell.cell.bias.numpy()
    pretrained._undo_normalization(layer, [cell])
    after = expected @ cell.cell.kernel.numpy() + cell.cell.bias.numpy()
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


def test_token_counts():
    config = sentiment_config.get_config("smoke")
    config.vocab_size = 8
    texts = tf.data.Dataset.from_tensor_slices((["a b a", "c a"], [0, 1]))
    vectorizer = keras.layers.TextVectorization(max_tokens=8, ragged=True)
    vectorizer.set_vocabulary(["a", "b", "c"])
    np.testing.assert_array_equal(input_pipeline.token_counts(texts, vectorizer, config),
                                  [0, 0, 3, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("overrides, message", [
    ({"adversarial_epsilon": -1.0}, "--config.adversarial_epsilon=-1.0 is invalid"),
    ({"virtual_adversarial_xi": 0.0}, "--config.virtual_adversarial_xi=0.0 is invalid"),
    ({"adversarial_weight": 0.0}, "--config.adversarial_weight=0.0 is invalid"),
    ({"model": "ngrams", "adversarial_epsilon": 1.0}, "need an embedding"),
])
def test_bad_config_values(tmp_path, overrides, message):
    config = sentiment_config.get_config("smoke")
    config.update(overrides)
    with pytest.raises(RecipeError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variant", ["smoke", "zh_smoke"])
def test_recipe_trains_and_exports_the_plain_model(tmp_path, variant):
    """Normalized embeddings, both perturbations (words: with IMDB's unlabelled reviews):
    it trains, logs the terms, and its export serves what the Keras model computes."""
    config = sentiment_config.get_config(variant)
    config.update(normalize_embeddings=True, adversarial_epsilon=1.0,
                  virtual_adversarial_epsilon=1.0, epochs=1)
    metrics = train.train_and_evaluate(config, str(tmp_path))
    assert {"adversarial_loss", "virtual_adversarial_loss"} <= metrics["train"].keys()
    assert metrics["train"]["virtual_adversarial_loss"] > 0
    assert metrics["test"].keys() == {"loss", "accuracy"}

    ran = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))
    vectorizer = input_pipeline.make_vectorizer(ran, None, tmp_path / "vocab.txt")
    model = models.create_model(ran)  # the classifier alone, from its weights file
    model.load_weights(tmp_path / "checkpoints" / "best.weights.h5")
    assert models.embedding_layer(model).frequencies.numpy().sum() > 1000
    texts = ["A wonderful, moving film.", "Dull.", "我爱中国", ""]
    ids = input_pipeline.to_ids(vectorizer, tf.constant(texts), ran.max_length)
    loaded = tf.saved_model.load(str(tmp_path / "export" / "1"))
    assert set(loaded.signatures) == {"serving_default", "explain"}
    served = loaded.signatures["serving_default"](text=tf.constant(texts))["probability"]
    np.testing.assert_allclose(served.numpy(), model(ids, training=False).numpy()[:, 0],
                               atol=1e-5)


def _filled(tokens: np.ndarray, labels: np.ndarray, rows: int) -> tuple:
    """`(tokens, labels, weights)` filled up to `rows` rows with empty ones of weight 0."""
    extra = rows - len(tokens)
    return (np.pad(tokens, [[0, extra], [0, 0]]), np.pad(labels, [0, extra]),
            np.pad(np.ones(len(tokens), np.float32), [0, extra]))


def _recipe_trainers(**overrides) -> list[keras.Model]:
    """Two equal models of the smoke config (no dropout), compiled as the recipe does."""
    config = sentiment_config.get_config("smoke")
    config.update(word_dropout=0.0, dropout=0.0, vocab_size=16, **overrides)
    trainers = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        trainers.append(train.compiled_trainer(models.create_model(config), config, 10))
    return trainers


@pytest.mark.parametrize("perturbations", [{}, {"adversarial_epsilon": 0.5}])
def test_a_filled_up_batch_trains_as_its_real_rows_alone(perturbations):
    """The recipe's compiled loss and metrics on a batch filled up with empty rows of weight 0
    (input_pipeline.training_batches): the steps and logs of its real rows alone."""
    alone, filled = _recipe_trainers(**perturbations)
    tokens, labels, weights = _filled(TOKENS, LABELS, 8)
    for _ in range(2):
        expected = alone.train_on_batch(TOKENS, LABELS, return_dict=True)
        logs = filled.train_on_batch(tokens, labels, sample_weight=weights, return_dict=True)
    assert logs.keys() == expected.keys()
    for name in logs:
        assert logs[name] == pytest.approx(expected[name], rel=1e-5), name
    for a, b in zip(alone.get_weights(), filled.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_virtual_adversarial_loss_of_a_filled_up_batch_is_that_of_its_real_rows():
    alone, filled = _recipe_trainers(virtual_adversarial_epsilon=0.5)
    tokens, labels, weights = _filled(TOKENS, LABELS, 8)
    direction = tf.random.normal([3, 6, 16], seed=4)
    out, gradients = alone.adversarial_losses(tf.constant(TOKENS), tf.constant(LABELS),
                                              training=False, direction=direction)
    other, other_gradients = filled.adversarial_losses(
        tf.constant(tokens), tf.constant(labels), training=False,
        direction=tf.pad(direction, [[0, 5], [0, 0], [0, 0]]), sample_weight=weights)
    assert float(out["virtual_adversarial_loss"]) > 0
    for name in ("loss", "virtual_adversarial_loss"):
        assert float(other[name]) == pytest.approx(float(out[name]), rel=1e-4), name
    np.testing.assert_allclose(other["virtual_adversarial_r"][:3], out["virtual_adversarial_r"],
                               rtol=1e-4, atol=1e-7)
    for a, b in zip(gradients, other_gradients, strict=True):
        np.testing.assert_allclose(tf.convert_to_tensor(a), tf.convert_to_tensor(b),
                                   rtol=1e-4, atol=1e-6)
