"""TensorBoard callbacks of our own, against the values they summarize."""

import keras
import numpy as np
import tensorflow as tf

import lstm_tf
from lstm_tf.diagnostics import gate_activations
from recipes.common import summaries


def _histograms(logdir, tag):
    """`{step: (lowest left edge, highest right edge, count)}` of `tag`'s histograms."""
    found = {}
    for path in logdir.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    buckets = tf.make_ndarray(value.tensor)
                    found[event.step] = (buckets[:, 0].min(), buckets[:, 1].max(),
                                         buckets[:, 2].sum())
    return found


def test_gate_histograms_follow_the_weights(tmp_path):
    """Each epoch's histogram is of the gates the model's weights give at that epoch."""
    ids = keras.Input([None], dtype="int32")
    x = keras.layers.Embedding(50, 8, mask_zero=True)(ids)
    x = lstm_tf.Bidirectional(lstm_tf.LSTM(4, return_sequences=True), name="bi")(x)
    model = keras.Model(ids, keras.layers.GlobalAveragePooling1D()(x))
    inputs = np.array([[3, 9, 27, 4, 0, 0], [5, 1, 2, 8, 6, 7]], "int32")
    callback = summaries.GateHistograms(tmp_path, inputs)
    callback.set_model(model)
    bi = model.get_layer("bi")
    expected = {}
    for epoch in range(2):
        rng = np.random.default_rng(epoch)
        model.set_weights([rng.normal(scale=2.0, size=w.shape) for w in model.get_weights()])
        callback.on_epoch_end(epoch)
        embedded = model.layers[1](inputs)
        gates = gate_activations(bi.forward_layer, embedded, inputs != 0)
        forget = tf.boolean_mask(gates["forget"], gates["mask"]).numpy()
        expected[epoch + 1] = (forget.min(), forget.max(), forget.size)
    found = _histograms(tmp_path, "gates/bi/forward/forget")
    assert found.keys() == expected.keys()
    for step, (low, high, count) in expected.items():
        np.testing.assert_allclose(found[step], (low, high, count), rtol=1e-6)
