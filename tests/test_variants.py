"""The LSTM variants: peepholes, layer norm, projection (LSTMP), zoneout.

References: the published equations in NumPy (peepholes: Gers & Schmidhuber
2000, as TF-Addons' PeepholeLSTMCell; layer norm: Ba et al. 2016, as
TF-Addons' LayerNormLSTMCell; zoneout: Krueger et al. 2017), torch.nn.LSTM
(proj_size) with mapped weights, and finite differences.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import lstm_tf
from lstm_tf.diagnostics import trace

B, T, D, U, P = 3, 6, 4, 5, 2
VARIANTS = {
    "peepholes": {"use_peepholes": True},
    "layer_norm": {"layer_norm": True},
    "projection": {"proj_size": P},
    "zoneout": {"zoneout_h": 0.3, "zoneout_c": 0.6},
    "all": {"use_peepholes": True, "layer_norm": True, "proj_size": P, "zoneout_h": 0.2,
            "zoneout_c": 0.1},
}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _layer_norm(x, gamma, beta, epsilon):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta


def numpy_lstm(cell, x, h, c):
    """The cell's published equations in NumPy (inference: zoneout's expectation)."""
    w = {v.path.split("/")[-2] + "/" + v.name if "norm" in v.path else v.name: v.numpy()
         for v in cell.weights}
    outputs = []
    for t in range(x.shape[1]):
        xw, hu = x[:, t] @ w["kernel"], h @ w["recurrent_kernel"]
        if cell.layer_norm:
            eps = cell.norm_epsilon
            xw = _layer_norm(xw, w["kernel_norm/gamma"], w["kernel_norm/beta"], eps)
            hu = _layer_norm(hu, w["recurrent_norm/gamma"], w["recurrent_norm/beta"], eps)
        z_i, z_f, z_c, z_o = np.split(xw + hu + w["bias"], 4, axis=-1)
        if cell.use_peepholes:
            z_i = z_i + w["input_gate_peephole_weights"] * c
            z_f = z_f + w["forget_gate_peephole_weights"] * c
        c_new = _sigmoid(z_f) * c + _sigmoid(z_i) * np.tanh(z_c)
        if cell.layer_norm:
            c_new = _layer_norm(c_new, w["state_norm/gamma"], w["state_norm/beta"],
                                cell.norm_epsilon)
        if cell.use_peepholes:
            z_o = z_o + w["output_gate_peephole_weights"] * c_new
        h_new = _sigmoid(z_o) * np.tanh(c_new)
        if cell.proj_size:
            h_new = h_new @ w["projection_kernel"]
        h = cell.zoneout_h * h + (1 - cell.zoneout_h) * h_new
        c = cell.zoneout_c * c + (1 - cell.zoneout_c) * c_new
        outputs.append(h)
    return np.stack(outputs, axis=1), h, c


def _layer(variant, dtype="float32", **kwargs):
    layer = lstm_tf.LSTM(U, return_sequences=True, return_state=True, dtype=dtype,
                         **VARIANTS[variant], **kwargs)
    layer.build((B, T, D))
    rng = np.random.default_rng(1)
    layer.set_weights([rng.normal(scale=0.6, size=w.shape).astype(dtype)
                       for w in layer.get_weights()])
    return layer


def _inputs(dtype="float32"):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, T, D)).astype(dtype)
    return x, rng


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_the_published_equations(variant):
    layer = _layer(variant)
    x, rng = _inputs()
    h0 = rng.normal(size=(B, layer.cell.state_size[0])).astype("float32")
    c0 = rng.normal(size=(B, U)).astype("float32")
    expected = numpy_lstm(layer.cell, x, h0, c0)
    for actual in (layer(x, initial_state=[h0, c0]),
                   tf.function(lambda x: layer(x, initial_state=[h0, c0]))(x)):
        for a, e in zip(actual, expected, strict=True):
            np.testing.assert_allclose(a, e, atol=1e-5)
    assert not layer.uses_fused_path() and not layer.uses_fused_path(training=False)


def test_projection_matches_torch():
    torch = pytest.importorskip("torch")  # the `bench`/`test` extras install it
    layer = _layer("projection")
    cell = layer.cell
    x, rng = _inputs()
    net = torch.nn.LSTM(D, U, proj_size=P, batch_first=True)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a.numpy().T))  # noqa: E731
    with torch.no_grad():
        net.weight_ih_l0.copy_(t(cell.kernel))
        net.weight_hh_l0.copy_(t(cell.recurrent_kernel))
        net.bias_ih_l0.copy_(torch.from_numpy(cell.bias.numpy()))
        net.bias_hh_l0.zero_()
        net.weight_hr_l0.copy_(t(cell.projection_kernel))
        y, (h, c) = net(torch.from_numpy(x))
    ours = layer(x)
    for a, e in zip(ours, (y, h[0], c[0]), strict=True):
        np.testing.assert_allclose(a, e.numpy(), atol=1e-5)
    assert ours[0].shape == (B, T, P) and ours[2].shape == (B, U)


@pytest.mark.filterwarnings("ignore:lstm_tf.LSTM .* cannot express this call")  # (TFLite's)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_match_finite_differences(variant):
    """Through inputs, initial states and every weight (float64; zoneout: inference;
    in a `tf.function`: the hundreds of evaluations run as one graph each)."""
    layer = _layer(variant, dtype="float64")
    x, rng = _inputs("float64")
    h0 = rng.normal(size=(B, layer.cell.state_size[0]))
    c0 = rng.normal(size=(B, U))
    weights = rng.normal(size=(B, T, layer.cell.output_size))

    @tf.function
    def loss(x, h0, c0):
        outputs, h, c = layer(x, initial_state=[h0, c0])
        return tf.reduce_sum(weights * outputs) + tf.reduce_sum(h ** 2) + tf.reduce_sum(c)

    theoretical, numerical = tf.test.compute_gradient(loss, [x, h0, c0])
    for a, n in zip(theoretical, numerical, strict=True):  # (a finite difference's error)
        np.testing.assert_allclose(a, n, rtol=1e-4, atol=1e-6)
    with tf.GradientTape() as tape:
        value = loss(x, h0, c0)
    grads = tape.gradient(value, layer.trainable_variables)
    for variable, grad in zip(layer.trainable_variables, grads, strict=True):
        flat = variable.numpy().reshape(-1)
        for k in rng.choice(flat.size, size=min(3, flat.size), replace=False):
            values = []
            for sign in (1, -1):
                moved = flat.copy()
                moved[k] += sign * 1e-6
                variable.assign(moved.reshape(variable.shape))
                values.append(float(loss(x, h0, c0)))
            variable.assign(flat.reshape(variable.shape))
            assert (values[0] - values[1]) / 2e-6 == pytest.approx(
                float(tf.reshape(grad, [-1])[k]), rel=1e-5, abs=1e-7), variable.path


def test_zoneout_keeps_units_at_random_in_training():
    x = np.random.default_rng(4).normal(size=(8, 40, D)).astype("float32")
    # zoneout_c=1: C never moves (h does: it reads the updated C, as in the paper).
    layer = lstm_tf.LSTM(64, return_state=True, zoneout_c=1.0, seed=3)
    _, h, c = layer(x, training=True)
    assert np.all(c.numpy() == 0) and np.any(h.numpy() != 0)
    layer = lstm_tf.LSTM(64, return_sequences=True, zoneout_h=0.3, seed=3)
    outputs = layer(x, training=True).numpy()
    previous = np.concatenate([np.zeros_like(outputs[:, :1]), outputs[:, :-1]], axis=1)
    kept = outputs == previous
    assert kept[:, 1:].mean() == pytest.approx(0.3, abs=0.02)  # 8 x 39 x 64 draws
    assert not np.array_equal(kept[:, 5], kept[:, 6])  # a new draw at every step
    np.testing.assert_allclose(  # inference: the expectation (numpy_lstm)
        layer(x, training=False), numpy_lstm(layer.cell, x, np.zeros((8, 64)),
                                             np.zeros((8, 64)))[0], atol=1e-5)


@pytest.mark.parametrize("variant", ["peepholes", "layer_norm", "projection"])
def test_serializes_wraps_and_exports(variant, tmp_path):
    inputs = keras.Input((T, D))
    bi = lstm_tf.Bidirectional(lstm_tf.LSTM(U, return_sequences=True, **VARIANTS[variant]))
    model = keras.Model(inputs, bi(inputs))
    x, _ = _inputs()
    expected = model(x)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(reloaded(x), expected, atol=1e-6)
    assert reloaded.layers[1].forward_layer.cell.get_config() == \
        bi.forward_layer.cell.get_config()
    model.export(str(tmp_path / "export"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    served = loaded.serve(x)
    np.testing.assert_allclose(served, expected, atol=1e-6)


def test_trace_records_every_part_aligned_to_the_positions():
    """`trace`'s h_t are the layer's outputs (after zoneout), at each step's position,
    masked steps zero."""
    x, _ = _inputs()
    mask = np.arange(T)[None] < np.array([T, 4, 1])[:, None]
    for go_backwards, variant in ((False, {"use_peepholes": True}), (True, {"use_peepholes": True}),
                                  (False, {"zoneout_h": 0.3, "zoneout_c": 0.6})):
        layer = lstm_tf.LSTM(U, return_sequences=True, go_backwards=go_backwards, **variant)
        outputs = layer(x, mask=mask).numpy()
        if go_backwards:  # Keras returns the steps in the order they were read
            outputs = outputs[:, ::-1]
        recorded = tf.function(lambda x, layer=layer: trace(layer, x, mask))(x)  # in a graph
        np.testing.assert_allclose(np.where(mask[..., None], outputs, 0), recorded["hidden"],
                                   atol=1e-6)
        np.testing.assert_array_equal(recorded["mask"], mask)
        for name in ("forget", "input", "output"):
            values = recorded[name].numpy()
            assert np.all(values[~mask] == 0) and np.all((values[mask] > 0) & (values[mask] < 1))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_trace_of_a_mixed_precision_layer_is_the_float32_layers(policy):
    """Under a mixed policy `trace` records in float32, from the float32 weights: the records of
    the float32 layer with the same weights."""
    x, _ = _inputs()
    mask = np.arange(T)[None] < np.array([T, 4, 1])[:, None]
    exact = lstm_tf.LSTM(U, return_sequences=True, use_peepholes=True)
    mixed = lstm_tf.LSTM(U, return_sequences=True, use_peepholes=True, dtype=policy)
    exact(x)
    mixed(x)
    mixed.set_weights(exact.get_weights())
    expected, got = trace(exact, x, mask), trace(mixed, x, mask)
    for name, values in expected.items():
        assert got[name].dtype == values.dtype
        np.testing.assert_array_equal(got[name], values)
