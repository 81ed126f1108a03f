"""The sentiment recipe's n-gram models: `--config.model=ngrams`, a logistic regression on
hashed n-grams, and `bilstm_ngrams`, that score added to the Bi-LSTM's.

References: the n-grams of each text enumerated in plain Python (integers without
overflow) and summed by hand; the count formula Σ_n max(L − n + 1, 0); the run's own
SavedModel for its deployment formats and the ensemble.
"""

import math

import numpy as np
import pytest
from recipe_testing import run_recipe

from recipes.common import deploy
from recipes.common.errors import RecipeError
from recipes.sentiment.model import HashedNgrams

TEXTS = ["", "great " * 600, "我爱中国", "A wonderful, moving film.",
         "Dreadful. The worst acting I have ever seen.", "not good, not good at all"]


def _reference(layer: HashedNgrams, rows: list[list[int]]) -> np.ndarray:
    """Each row's n-grams (1 to layer.ngrams tokens) hashed as the layer documents, in Python."""
    table, (bias,) = (w.numpy() for w in layer.weights)
    out = []
    for row in rows:
        total, count = 0.0, 0
        for n in range(1, layer.ngrams + 1):
            for start in range(len(row) - n + 1):
                hashed = n
                for token in row[start:start + n]:
                    hashed = (hashed * HashedNgrams.PRIME + token) % layer.buckets
                total, count = total + table[hashed], count + 1
        out.append(total / math.sqrt(max(count, 1)) + bias)
    return np.array(out, np.float32)[:, None]


def test_hashed_ngrams_scores_the_ngrams_of_the_real_tokens():
    rng = np.random.default_rng(0)
    layer = HashedNgrams(ngrams=3, buckets=1009)
    layer.build((None, None))
    layer.set_weights([rng.normal(size=1009).astype(np.float32), np.array([0.25], np.float32)])
    rows = [[], [7], [7, 8], [8, 7], [5, 900, 5, 900, 17], list(rng.integers(2, 50_000, 40))]
    batch = np.zeros((len(rows), 40), np.int64)  # right-padded with 0
    for i, row in enumerate(rows):
        batch[i, :len(row)] = row
    got = layer(batch).numpy()
    np.testing.assert_allclose(got, _reference(layer, rows), rtol=1e-5, atol=1e-6)
    assert got[2, 0] != got[3, 0]  # the order of the tokens counts (2-grams)
    for i, row in enumerate(rows):  # a text alone = the text in a padded batch
        alone = layer(np.array([row or [0]], np.int64)).numpy()
        np.testing.assert_allclose(alone, got[i:i + 1], rtol=1e-6)

    layer.set_weights([np.ones(1009, np.float32), np.zeros(1, np.float32)])
    lengths = [len(row) for row in rows]
    counts = [sum(max(length - n + 1, 0) for n in (1, 2, 3)) for length in lengths]
    np.testing.assert_allclose(layer(batch).numpy()[:, 0],
                               [c / math.sqrt(max(c, 1)) for c in counts], rtol=1e-6)


def test_ngrams_model_trains_exports_deploys_and_joins_an_ensemble(sentiment_run, tmp_path):
    """A smoke run of the ngrams model: its export serves text, has no `explain`, converts to
    every deployment format with built-in ops only, and averages with a Bi-LSTM export."""
    from configs import sentiment as sentiment_config
    from recipes.sentiment import deploy as sentiment_deploy
    from recipes.sentiment import explain, train

    config = sentiment_config.get_config("smoke")
    config.model, config.bag_buckets = "ngrams", 2**16  # (a smaller table converts faster)
    metrics = train.train_and_evaluate(config, str(tmp_path / "ngrams"))
    assert metrics["train"]["accuracy"] > 0.9  # 512 reviews: a linear model fits them
    export = str(tmp_path / "ngrams" / "export")
    expected = sentiment_deploy.predictor(export)(TEXTS)
    assert np.ptp(expected) > 1e-3
    with pytest.raises(RecipeError, match="no `explain` signature"):
        explain.explain(export, ["我爱中国"], str(tmp_path / "x.png"))

    written = sentiment_deploy.export(str(tmp_path / "ngrams"), list(deploy.FORMATS))
    for name in ("tflite", "tflite_dynamic", "tflite_int8"):
        content = written[name].read_bytes()
        assert not deploy.unwanted_ops(content), deploy.tflite_ops(content)
    for name in ("tflite", "onnx"):
        np.testing.assert_allclose(sentiment_deploy.predictor(str(written[name]))(TEXTS),
                                   expected, atol=1e-4, err_msg=name)

    members = [str(sentiment_run / "export"), export]
    run_recipe("sentiment", "ensemble", f"--workdir={tmp_path / 'ensemble'}",
               "--models=" + ",".join(members))
    mean = np.mean([sentiment_deploy.predictor(m)(TEXTS) for m in members], axis=0)
    np.testing.assert_allclose(
        sentiment_deploy.predictor(str(tmp_path / "ensemble" / "export"))(TEXTS), mean,
        atol=1e-6)


def test_bilstm_ngrams_model_explains_and_deploys_with_the_fused_op(tmp_path):
    """`model="bilstm_ngrams"`: P = sigmoid(Bi-LSTM score + n-gram score); its export keeps the
    `explain` signature, and its TFLite model has the fused LSTM op and the export's results."""
    import keras
    import tensorflow as tf

    from configs import sentiment as sentiment_config
    from recipes.sentiment import deploy as sentiment_deploy
    from recipes.sentiment import train

    config = sentiment_config.get_config("smoke")
    config.model, config.epochs, config.bag_buckets = "bilstm_ngrams", 1, 4096
    train.train_and_evaluate(config, str(tmp_path / "run"))
    model = sentiment_deploy.token_model(config, tmp_path / "run")
    ids = np.array([[5, 9, 31, 7, 0, 0], [12, 4, 8, 15, 16, 23]], np.int64)
    ngrams = model.get_layer("ngrams")(ids).numpy()
    assert np.abs(ngrams).max() > 1e-3  # the n-gram weights were trained
    bilstm = keras.Model(model.input, model.get_layer("bilstm_score").output)(ids).numpy()
    np.testing.assert_allclose(model(ids).numpy(), 1 / (1 + np.exp(-(bilstm + ngrams))),
                               rtol=1e-5)

    export = str(tmp_path / "run" / "export")
    expected = sentiment_deploy.predictor(export)(TEXTS)
    loaded = tf.saved_model.load(str(tmp_path / "run" / "export" / "1"))
    explained = loaded.signatures["explain"](text=tf.constant(TEXTS))["probability"].numpy()
    np.testing.assert_allclose(explained, expected, atol=1e-6)
    (path,) = sentiment_deploy.export(str(tmp_path / "run"), ["tflite"]).values()
    content = path.read_bytes()
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in deploy.tflite_ops(content)
    assert not deploy.unwanted_ops(content)
    np.testing.assert_allclose(sentiment_deploy.predictor(str(path))(TEXTS), expected,
                               atol=1e-4)
