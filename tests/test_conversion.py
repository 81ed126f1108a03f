"""lstm_tf layers through the converters: TFLite's fused LSTM op (LiteRT), ONNX's LSTM.

References: the same Keras model run by TensorFlow (outputs to 1e-5), and the
op lists of the converted models (the fused op present, no loop, no Flex op).
"""

import warnings

import keras
import numpy as np
import onnxruntime
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import lstm_tf
from lstm_tf import conversion

B, T, D, U = 2, 11, 5, 6
FUSED = "UNIDIRECTIONAL_SEQUENCE_LSTM"
LOOPS = ("WHILE", "FLEX", "CUSTOM")
VARIABLES = ("VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE")
# TensorFlow's int8 calibration runs its own deprecated tf.lite.Interpreter, and
# `from_keras_model` warns that it has no input statistics (it needs none: float inputs).
CALIBRATION = pytest.mark.filterwarnings(
    "ignore:(.*tf.lite.Interpreter is deprecated|Statistics for quantized inputs)")


def _ops(content: bytes) -> set[str]:
    return {op["op_name"] for op in Interpreter(model_content=content)._get_ops_details()}


def _run_tflite(content: bytes, inputs: dict, repeat: int = 1) -> dict:
    runner = Interpreter(model_content=content).get_signature_runner()
    outputs = [runner(**inputs) for _ in range(repeat)]
    for later in outputs[1:]:  # no state is carried from one invocation to the next
        for name, value in later.items():
            np.testing.assert_array_equal(value, outputs[0][name])
    return outputs[0]


def _randomize(model: keras.Model) -> keras.Model:
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    return model


def _model(kind: str, batch: int | None = B) -> keras.Model:
    x = keras.Input(batch_shape=(batch, T, D), name="x")
    inputs = [x]
    if kind == "sequences":
        out = {"y": lstm_tf.LSTM(U, return_sequences=True)(x)}
    elif kind == "last":
        out = {"y": lstm_tf.LSTM(U)(x)}
    elif kind == "state":
        y, h, c = lstm_tf.LSTM(U, return_sequences=True, return_state=True)(x)
        out = {"y": y, "h": h, "c": c}
    elif kind == "go_backwards":
        out = {"y": lstm_tf.LSTM(U, return_sequences=True, go_backwards=True)(x)}
    elif kind == "stacked":
        out = {"y": lstm_tf.LSTM(4)(lstm_tf.LSTM(U, return_sequences=True)(x))}
    elif kind == "bidirectional":
        out = {"y": lstm_tf.Bidirectional(lstm_tf.LSTM(U, return_sequences=True))(x)}
    elif kind == "dropout":  # (no dropout at inference, and no seed generator update)
        out = {"y": lstm_tf.Bidirectional(lstm_tf.LSTM(
            U, return_sequences=True, dropout=0.3, recurrent_dropout=0.2))(x)}
    elif kind == "bidirectional_state":
        y, *states = lstm_tf.Bidirectional(lstm_tf.LSTM(U, return_state=True))(x)
        out = dict(zip(["y", "h_fw", "c_fw", "h_bw", "c_bw"], [y, *states], strict=True))
    elif kind == "initial_state":
        h0 = keras.Input(batch_shape=(batch, U), name="h0")
        c0 = keras.Input(batch_shape=(batch, U), name="c0")
        inputs += [h0, c0]
        y, h, c = lstm_tf.LSTM(U, return_sequences=True, return_state=True)(
            x, initial_state=[h0, c0])
        out = {"y": y, "h": h, "c": c}
    return _randomize(keras.Model(inputs, out))


def _inputs(model: keras.Model) -> dict:
    rng = np.random.default_rng(2)
    return {i.name: rng.normal(size=i.shape).astype("float32") for i in model.inputs}


def _expected(model: keras.Model, inputs: dict) -> dict:
    return {k: np.asarray(v) for k, v in model(inputs, training=False).items()}


def _assert_equal_outputs(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, atol=atol, err_msg=name)


@pytest.mark.parametrize("kind", ["sequences", "last", "state", "go_backwards", "stacked",
                                  "bidirectional", "dropout", "bidirectional_state",
                                  "initial_state"])
def test_keras_model_converts_to_the_fused_op(kind):
    model = _model(kind)
    content = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    ops = _ops(content)
    assert FUSED in ops and not [op for op in ops if op.startswith(LOOPS + VARIABLES)], ops
    inputs = _inputs(model)
    _assert_equal_outputs(_run_tflite(content, inputs, repeat=2), _expected(model, inputs))


def test_saved_model_converts_to_the_fused_op(tmp_path):
    """A SavedModel with a fixed batch size (`model.export` relaxes it unless told)."""
    model = _model("bidirectional_state")
    model.export(str(tmp_path), verbose=False,
                 input_signature=[tf.TensorSpec((B, T, D), name="x")])
    content = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path)).convert()
    ops = _ops(content)
    assert FUSED in ops and "WHILE" not in ops, ops
    inputs = _inputs(model)
    actual = _run_tflite(content, inputs)
    expected = list(_expected(model, inputs).values())  # (export names outputs its own way)
    for value in expected:
        assert any(v.shape == value.shape and np.allclose(v, value, atol=1e-5)
                   for v in actual.values())


def _token_model(batch: int | None) -> keras.Model:
    tokens = keras.Input(batch_shape=(batch, None), dtype="int32", name="tokens")
    x = keras.layers.Embedding(50, D)(tokens)
    x = lstm_tf.Bidirectional(lstm_tf.LSTM(U, return_sequences=True))(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return _randomize(keras.Model(tokens, {"p": keras.layers.Dense(1, "sigmoid")(x)}))


def _quantized(model: keras.Model, quantization: str, data: list[np.ndarray]) -> bytes:
    """`model` (one input) converted with "dynamic" or "int8" quantization (calibrated on
    `data`)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "int8":
        name = model.inputs[0].name
        converter.representative_dataset = lambda: ({name: d} for d in data)
    return converter.convert()


@CALIBRATION
@pytest.mark.parametrize("quantization", ["dynamic", "int8"])
def test_quantized_models_keep_the_fused_op(quantization):
    model = _token_model(batch=1)
    rng = np.random.default_rng(3)
    data = [rng.integers(0, 50, size=(1, int(n))).astype("int32") for n in rng.integers(3, 30, 40)]
    content = _quantized(model, quantization, data)
    ops = _ops(content)
    assert FUSED in ops and not [op for op in ops if op.startswith(LOOPS)], ops
    if quantization == "int8":  # an integer LSTM: int8 weights
        it = Interpreter(model_content=content)
        lstm = next(op for op in it._get_ops_details() if op["op_name"] == FUSED)
        assert it._get_tensor_details(lstm["inputs"][1], 0)["dtype"] == np.int8
    runner = Interpreter(model_content=content).get_signature_runner()
    for tokens in data[:5]:  # any length (batch 1), close to the float model
        p = runner(tokens=tokens)["p"]
        np.testing.assert_allclose(p, model(tokens)["p"], atol=0.05)


@CALIBRATION
def test_int8_bidirectional_halves_are_read_at_the_scale_they_are_written():
    # The fused op writes its outputs at its hidden state's scale and zero point, and
    # REVERSE_V2 copies bytes: unless the model requantizes before the concatenation
    # (which imposes one scale on its inputs), both halves are misread.
    x = keras.Input(batch_shape=(1, None, D), name="x")
    model = _randomize(keras.Model(x, {"y": lstm_tf.Bidirectional(
        lstm_tf.LSTM(U, return_sequences=True))(x)}))
    rng = np.random.default_rng(4)
    data = [rng.normal(size=(1, T, D)).astype("float32") for _ in range(40)]
    it = Interpreter(model_content=_quantized(model, "int8", data))
    quantization = {t["index"]: t["quantization"] for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    lstms = [op for op in ops if op["op_name"] == FUSED]
    assert len(lstms) == 2
    for op in lstms:  # output written at the hidden state's (input 18) scale
        assert quantization[op["outputs"][0]] == quantization[op["inputs"][18]]
    for op in ops:
        if op["op_name"] == "REVERSE_V2":
            assert quantization[op["outputs"][0]] == quantization[op["inputs"][0]]
    runner = it.get_signature_runner()
    errors = np.stack([runner(x=d)["y"] - model(d)["y"] for d in data[:10]])
    assert abs(errors.mean()) < 0.01 and np.sqrt((errors ** 2).mean()) < 0.1


@pytest.mark.parametrize("arguments, named", [({"activation": "relu"}, "activation='relu'"),
                                              ({"use_peepholes": True}, "use_peepholes=True")])
def test_unfusable_configuration_warns_and_keeps_the_loop(arguments, named):
    x = keras.Input(batch_shape=(1, T, D), name="x")
    model = keras.Model(x, lstm_tf.LSTM(U, **arguments)(x))
    with pytest.warns(UserWarning, match=named):
        content = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    assert FUSED not in _ops(content) and "WHILE" in _ops(content)
    inputs = {"x": np.ones((1, T, D), "float32")}
    np.testing.assert_allclose(list(_run_tflite(content, inputs).values())[0],
                               model(inputs["x"]), atol=1e-5)


def _masked_model(batch: int | None) -> keras.Model:
    tokens = keras.Input(batch_shape=(batch, None), dtype="int32")
    x = keras.layers.Embedding(9, D, mask_zero=True)(tokens)
    return keras.Model(tokens, lstm_tf.Bidirectional(lstm_tf.LSTM(U, name="masked"))(x))


def test_mask_warns_only_in_a_model_with_a_fixed_batch_size():
    ids = np.ones((1, 4), "int32")
    fixed, free = _masked_model(1), _masked_model(None)
    with pytest.warns(UserWarning, match="'forward_masked': a mask"):
        tf.function(lambda t: fixed(t, training=False))(ids)
    with warnings.catch_warnings():  # a batch size fixed only by the call's input: silent
        warnings.simplefilter("error")
        tf.function(lambda t: free(t, training=False))(ids)


@pytest.mark.parametrize("masked", [False, True])
def test_onnx_lstm_ops_with_dynamic_batch_and_length(masked):
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(50, D, mask_zero=masked)(tokens)
    x = lstm_tf.Bidirectional(lstm_tf.LSTM(U, return_sequences=True))(x)
    x, h, c = lstm_tf.LSTM(4, return_state=True, go_backwards=True)(x)
    model = _randomize(keras.Model(tokens, [x, c]))
    proto = conversion.to_onnx(lambda t: model(t, training=False),
                               [tf.TensorSpec([None, None], tf.int32, name="tokens")])
    op_types = [n.op_type for n in proto.graph.node]
    assert op_types.count("LSTM") == 3 and "Loop" not in op_types, op_types
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    rng = np.random.default_rng(4)
    for shape in [(1, 3), (4, 13)]:
        ids = rng.integers(1, 50, size=shape).astype("int32")
        if masked:  # right padding of different lengths, one row all padding
            ids[1:, -3:] = 0
            ids[-1] = 0
        actual = session.run(None, {"tokens": ids})
        for a, e in zip(actual, model(ids), strict=True):
            np.testing.assert_allclose(a, e, atol=1e-5)


def test_inference_in_a_graph_equals_eager_and_the_step_loop():
    """The converter-friendly inference function computes what the other paths compute."""
    x = np.random.default_rng(5).normal(size=(B, T, D)).astype("float32")
    step = lstm_tf.LSTM(U, return_sequences=True, return_state=True, fused=False)
    auto = lstm_tf.LSTM(U, return_sequences=True, return_state=True)
    step(x)
    auto(x)
    auto.set_weights([w * 3 for w in step.get_weights()])
    step.set_weights(auto.get_weights())
    expected = step(x)
    for actual in (auto(x), tf.function(lambda x: auto(x, training=False))(x)):
        for a, e in zip(actual, expected, strict=True):
            np.testing.assert_allclose(a, e, atol=1e-5)


def test_final_cell_state_equals_the_loop_also_for_right_padded_sequences():
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(3, T, D)).astype("float32"))
    layer = lstm_tf.LSTM(U, return_sequences=True, return_state=True, fused=False)
    layer(x)
    layer.set_weights([rng.normal(scale=0.7, size=w.shape).astype("float32")
                       for w in layer.get_weights()])
    h0, c0 = (tf.constant(rng.normal(size=(3, U)).astype("float32")) for _ in range(2))
    lengths = tf.constant([T, 4, 0])
    mask = tf.sequence_mask(lengths, T)
    outputs, _, c = layer(x, initial_state=[h0, c0], mask=mask)
    cell = layer.cell
    rebuilt = conversion.final_cell(x, outputs, h0, c0, cell.kernel, cell.recurrent_kernel,
                                    cell.bias, lengths)
    np.testing.assert_allclose(rebuilt, c, atol=1e-5)
