"""lstm_tf layers against Keras's built-in layers, finite differences and fresh processes."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import lstm_tf

B, T, D, U = 3, 7, 5, 4
ATOL = 1e-5
PATH = {"fused": "auto"}


@pytest.fixture(autouse=True, params=["step", "fused"])
def lstm_path(request):
    """Runs every test on the step-by-step path and on the fused path."""
    PATH["fused"] = False if request.param == "step" else True
    yield request.param


def LSTM(units, **kwargs):  # noqa: N802
    """`lstm_tf.LSTM` on the path of the running test."""
    return lstm_tf.LSTM(units, fused=PATH["fused"], **kwargs)


def _data(seed=0, b=B, t=T, d=D):
    return np.random.default_rng(seed).normal(size=(b, t, d)).astype("float32")


def _mask(lengths, t=T):
    return np.arange(t)[None, :] < np.asarray(lengths)[:, None]


def _random_weights(layer, seed=1):
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32")
                       for w in layer.get_weights()])


def _pair(ours, ref, x):
    """Builds both layers on x, gives them the same random weights."""
    ours(x)
    ref(x)
    _random_weights(ours)
    ref.set_weights(ours.get_weights())


def _assert_close(a, b, atol=ATOL):
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=0)


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_lstm_matches_keras(return_sequences, return_state, go_backwards, masked):
    kw = dict(return_sequences=return_sequences, return_state=return_state,
              go_backwards=go_backwards)
    ours, ref = LSTM(U, **kw), keras.layers.LSTM(U, **kw)
    x = _data()
    _pair(ours, ref, x)
    mask = _mask([T, 4, 1]) if masked else None
    _assert_close(ours(x, mask=mask), ref(x, mask=mask))


def test_lstm_initial_state_matches_keras():
    ours, ref = LSTM(U, return_state=True), keras.layers.LSTM(U, return_state=True)
    x = _data()
    _pair(ours, ref, x)
    rng = np.random.default_rng(3)
    state = [rng.normal(size=(B, U)).astype("float32") for _ in range(2)]
    _assert_close(ours(x, initial_state=state), ref(x, initial_state=state))


def test_weights_transfer_both_ways():
    x = _data()
    ours, ref = LSTM(U), keras.layers.LSTM(U)
    ours(x)
    ref(x)
    _random_weights(ref)
    ours.set_weights(ref.get_weights())
    _assert_close(ours(x), ref(x))
    assert [w.shape for w in ours.get_weights()] == [(D, 4 * U), (U, 4 * U), (4 * U,)]


def test_stateful_and_reset_state_match_keras():
    kw = dict(stateful=True, return_sequences=True)
    ours, ref = LSTM(U, **kw), keras.layers.LSTM(U, **kw)
    x1, x2 = _data(1), _data(2)
    _pair(ours, ref, x1)
    for layer in (ours, ref):
        layer.reset_state()
    for x in (x1, x2):
        _assert_close(ours(x), ref(x))
    ours.reset_state()
    ref.reset_state()
    _assert_close(ours(x2), ref(x2))
    assert not np.allclose(ours(x2), ours(x2))  # the state carries over


def test_cell_inside_keras_rnn_matches_keras_lstm():
    ours = keras.layers.RNN(lstm_tf.LSTMCell(U), return_sequences=True)
    ref = keras.layers.LSTM(U, return_sequences=True)
    x = _data()
    _pair(ours, ref, x)
    _assert_close(ours(x), ref(x))


def test_chrono_initialization():
    t_max = 500
    layer = LSTM(64, chrono_max_delay=t_max)
    layer(_data())
    bias = layer.get_weights()[2]
    b_i, b_f, rest = bias[:64], bias[64:128], bias[128:]
    assert (b_f >= 0).all() and (b_f <= np.log(t_max - 1)).all()
    assert b_f.std() > 0.5 and np.log(t_max - 1) - b_f.max() < 1.0  # spread over the range
    np.testing.assert_array_equal(b_i, -b_f)
    np.testing.assert_array_equal(rest, 0.0)
    assert lstm_tf.LSTM.from_config(layer.get_config()).cell.chrono_max_delay == t_max
    with pytest.raises(ValueError, match="chrono_max_delay"):
        lstm_tf.LSTMCell(4, chrono_max_delay=2)


def test_unit_forget_bias():
    layer = LSTM(U)
    layer(_data())
    bias = layer.get_weights()[2]
    np.testing.assert_array_equal(bias[U:2 * U], 1.0)
    np.testing.assert_array_equal(np.delete(bias, np.s_[U:2 * U]), 0.0)


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave", None])
@pytest.mark.parametrize("masked", [False, True])
def test_bidirectional_matches_keras(merge_mode, masked):
    ours = lstm_tf.Bidirectional(LSTM(U, return_sequences=True), merge_mode=merge_mode)
    ref = keras.layers.Bidirectional(keras.layers.LSTM(U, return_sequences=True),
                                     merge_mode=merge_mode)
    x = _data()
    _pair(ours, ref, x)
    mask = _mask([T, 4, 1]) if masked else None
    _assert_close(ours(x, mask=mask), ref(x, mask=mask))


def test_bidirectional_return_state_and_initial_state_match_keras():
    ours = lstm_tf.Bidirectional(LSTM(U, return_state=True))
    ref = keras.layers.Bidirectional(keras.layers.LSTM(U, return_state=True))
    x = _data()
    _pair(ours, ref, x)
    rng = np.random.default_rng(4)
    state = [rng.normal(size=(B, U)).astype("float32") for _ in range(4)]
    out = ours(x, initial_state=state)
    assert len(out) == 5 and out[0].shape == (B, 2 * U)
    _assert_close(out, ref(x, initial_state=state))


@pytest.mark.parametrize("return_state", [False, True])
def test_bidirectional_in_a_graph_matches_keras(return_state):
    """(At inference in a graph, the concatenation is ours: with a requantization point.)"""
    ours = lstm_tf.Bidirectional(LSTM(U, return_sequences=True, return_state=return_state))
    ref = keras.layers.Bidirectional(
        keras.layers.LSTM(U, return_sequences=True, return_state=return_state))
    x = _data()
    _pair(ours, ref, x)
    mask = _mask([T, 4, 1])
    out = tf.function(lambda x: ours(x, mask=mask))(x)
    assert (out[0] if return_state else out).shape == (B, T, 2 * U)
    _assert_close(out, ref(x, mask=mask))
    assert ours.merge_mode == "concat"


def test_bidirectional_wraps_keras_simple_rnn():
    ours = lstm_tf.Bidirectional(keras.layers.SimpleRNN(U, return_sequences=True))
    ref = keras.layers.Bidirectional(keras.layers.SimpleRNN(U, return_sequences=True))
    x = _data()
    _pair(ours, ref, x)
    mask = _mask([T, 4, 1])
    _assert_close(ours(x, mask=mask), ref(x, mask=mask))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_invariance(bidirectional):
    """Right-padded masked batch == each sequence run on its own, unpadded."""
    def make():
        layer = LSTM(U, return_sequences=True, return_state=True)
        return lstm_tf.Bidirectional(layer) if bidirectional else layer

    layer = make()
    lengths = [T, 4, 1]
    x = _data()
    x[~_mask(lengths)] = 9.0  # padding garbage must not leak in
    layer(x)
    _random_weights(layer)
    seq, *states = layer(x, mask=_mask(lengths))
    for b, n in enumerate(lengths):
        seq_b, *states_b = layer(x[b:b + 1, :n])
        _assert_close(seq[b, :n], seq_b[0])
        _assert_close([s[b] for s in states], [s[0] for s in states_b])


def test_gradients_match_finite_differences():
    layer = LSTM(3, return_sequences=True, dtype="float64")
    x = _data(b=2, t=4, d=3).astype("float64")
    layer(x)
    _random_weights(layer)
    mask = _mask([4, 2], t=4)

    def f(x, kernel, recurrent_kernel, bias):
        out, _ = layer.stateless_call([kernel, recurrent_kernel, bias],
                                    layer.non_trainable_variables, x, mask=mask)
        return out

    theoretical, numerical = tf.test.compute_gradient(
        f, [tf.constant(x)] + [tf.constant(w) for w in layer.get_weights()])
    for t_grad, n_grad in zip(theoretical, numerical, strict=True):
        np.testing.assert_allclose(t_grad, n_grad, atol=1e-6)


def _tiny_model():
    inputs = keras.Input((T, D))
    hidden = lstm_tf.Bidirectional(LSTM(U, return_sequences=True))(inputs)
    outputs = LSTM(U)(hidden)
    model = keras.Model(inputs, outputs)
    for layer in model.layers:
        _random_weights(layer)
    return model


def test_keras_file_round_trip(tmp_path):
    model = _tiny_model()
    x = _data()
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.layers[1], lstm_tf.Bidirectional)
    assert isinstance(restored.layers[1].forward_layer, lstm_tf.LSTM)
    _assert_close(restored(x), model(x), atol=0)


def test_saved_model_serves_without_lstm_tf(tmp_path):
    model = _tiny_model()
    x = _data()
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros((B, U), "float32"), verbose=0)  # a traced gradient must not break export
    np.save(tmp_path / "x.npy", x)
    model.export(str(tmp_path / "export"), verbose=False)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({str(tmp_path / "export")!r})
        y = loaded.serve(tf.constant(np.load({str(tmp_path / "x.npy")!r})))
        assert "lstm_tf" not in sys.modules
        np.save({str(tmp_path / "y.npy")!r}, y.numpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    _assert_close(np.load(tmp_path / "y.npy"), model(x))


def _identity_candidate_lstm(**kwargs):
    """An LSTM whose gates are pinned open (f=0, i=o=1): h_t = tanh(tanh(z_c))."""
    layer = LSTM(U, return_sequences=True, **kwargs)
    layer(np.zeros((1, T, U), "float32"))
    kernel = np.zeros((U, 4 * U), "float32")
    recurrent = np.zeros((U, 4 * U), "float32")
    bias = np.zeros(4 * U, "float32")
    bias[:U], bias[U:2 * U], bias[3 * U:] = 50.0, -50.0, 50.0
    return layer, kernel, recurrent, bias


def test_input_dropout_is_variational_and_off_at_inference():
    layer, kernel, recurrent, bias = _identity_candidate_lstm(dropout=0.5, seed=7)
    kernel[:, 2 * U:3 * U] = np.eye(U)
    layer.set_weights([kernel, recurrent, bias])
    x = np.ones((16, T, U), "float32")
    expected = np.tanh(np.tanh(1.0))
    _assert_close(layer(x, training=False), np.full((16, T, U), expected))
    dropped = np.asarray(layer(x, training=True)) == 0
    assert 0 < dropped.mean() < 1
    assert (dropped == dropped[:, :1]).all()  # one mask for every time step


@pytest.mark.parametrize("lstm_path", ["step"], indirect=True)  # (the fused path has none)
def test_recurrent_dropout_is_variational_and_off_at_inference():
    layer, kernel, recurrent, bias = _identity_candidate_lstm(recurrent_dropout=0.5, seed=7)
    bias[2 * U:3 * U] = 1.0  # z_c = 1 + h_{t-1}·mask
    recurrent[:, 2 * U:3 * U] = np.eye(U)
    layer.set_weights([kernel, recurrent, bias])
    x = np.zeros((16, T, U), "float32")
    reference = LSTM(U, return_sequences=True)
    reference(x)
    reference.set_weights(layer.get_weights())
    _assert_close(layer(x, training=False), reference(x))
    out = np.asarray(layer(x, training=True))
    dropped = np.isclose(out, np.tanh(np.tanh(1.0)), atol=1e-6)
    assert dropped[:, 0].all()  # h_0 = 0: nothing to drop yet
    assert 0 < dropped[:, 1:].mean() < 1
    assert (dropped[:, 1:] == dropped[:, 1:2]).all()


def test_wrong_rank_names_expected_shape():
    with pytest.raises(ValueError, match=r"\(batch, timesteps, features\)"):
        LSTM(U)(np.ones((B, D), "float32"))


def test_mismatched_initial_state_names_expected_shape():
    x = _data()
    bad = [np.zeros((B, U + 1), "float32"), np.zeros((B, U), "float32")]
    with pytest.raises(ValueError, match=rf"\({B}, {U}\)"):
        LSTM(U)(x, initial_state=bad)
    with pytest.raises(ValueError, match=r"\[h_0, C_0\]"):
        LSTM(U)(x, initial_state=bad[:1])


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="units"):
        lstm_tf.LSTMCell(0)
    with pytest.raises(ValueError, match="dropout"):
        LSTM(U, dropout=1.5)


def test_trains_with_keras_fit():
    """A small model learns with `fit` (the sign of the last step's input), on both paths."""
    keras.utils.set_random_seed(0)
    x = _data(0, b=256, t=6, d=2)
    y = (x[:, -1, 0] > 0).astype("float32")
    model = keras.Sequential([keras.Input((6, 2)), LSTM(8),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.Adam(0.05), "binary_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert history.history["accuracy"][-1] > 0.9
