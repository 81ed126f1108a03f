"""The inference graph of `lstm_tf.LSTM` as converters expect it: TFLite's fused LSTM op.

TensorFlow Lite's converter (its MLIR pass `prepare_composite_functions_tf`)
replaces a `tf.function` whose `api_implements` attribute starts with `lstm_`
by one `UNIDIRECTIONAL_SEQUENCE_LSTM` op, as it does for Keras 2's LSTM, when

* the function takes exactly `(inputs, init_h, init_c, kernel,
  recurrent_kernel, bias)` (batch-major inputs, Keras's weight layout, gate
  order i, f, c, o; attributes `time_major` and `go_backwards`) and returns five
  tensors, of which only the first two (the last output and all outputs) are used;
* the batch size is static and the weights are constants at conversion (a
  model's variables are);
* there is no mask (the fused op has no mask input).

`lstm_tf.LSTM` runs its inference calls (inside a `tf.function`, unmasked,
tanh/sigmoid) through such a function, `composite`, whose body is the fused
path (`lstm_tf.fused`): in TensorFlow nothing changes but the speed, and a
conversion gets the fused op, with `Bidirectional` one per direction.

The fused op returns no final cell state. When it is needed (`return_state`,
`stateful`), C_T is rebuilt from the op's outputs with ordinary ops, no loop:
with h_{t-1} known for every step, all gates are one matmul, and

    C_T = Π_t f_t · C_0 + Σ_t (Π_{s>t} f_s) · i_t · C̃_t,

the products as exponentials of (reverse, exclusive) cumulative sums of log f.

ONNX: tf2onnx rewrites the while loop of Keras 2's LSTM (a recognised pattern
of TensorList, MatMul, BiasAdd, Split, Sigmoid and Tanh ops, with sequence
lengths as a `Select`) into ONNX's `LSTM` op, and a forward and a backward one
over the same input into one bidirectional `LSTM`. Inside `onnx_graph()`
(`to_onnx` enters it), inference calls trace as that loop (`run_onnx`),
masks (right-padded) becoming the op's `sequence_lens`.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf

from lstm_tf import fused as fused_lib

_calls = itertools.count()  # numbers each call of `run` (see there)


def unfusable_attributes(layer: Any, mask: Any) -> list[str]:
    """What keeps TFLite's fused LSTM op from expressing a call of `layer` (empty: nothing)."""
    cell = layer.cell
    found = []
    if layer.fused is False:
        found.append("fused=False (the step loop was asked for)")
    if cell.activation is not keras.activations.tanh:
        found.append(f"activation={keras.activations.serialize(cell.activation)!r} "
                     "(the op computes tanh)")
    if cell.recurrent_activation is not keras.activations.sigmoid:
        found.append("recurrent_activation="
                     f"{keras.activations.serialize(cell.recurrent_activation)!r} "
                     "(the op's gates are sigmoids)")
    if layer.unroll:
        found.append("unroll=True")
    for name in ("use_peepholes", "layer_norm", "proj_size", "zoneout_h", "zoneout_c"):
        if getattr(cell, name):
            found.append(f"{name}={getattr(cell, name)!r} (the Keras-LSTM conversion has no "
                         "such input)")
    if cell.compute_dtype != "float32":
        found.append(f"dtype={cell.compute_dtype!r} (float32 only)")
    if mask is not None:
        found.append("a mask (the op has none: feed each sequence alone at its true length, "
                     "without padding or masking, e.g. Embedding(mask_zero=False))")
    return found


def warn_unfusable(layer: Any, reasons: list[str], op: str = "TFLite's fused LSTM op") -> None:
    """A `UserWarning` naming what keeps an inference call off a converter's LSTM op."""
    warnings.warn(
        f"lstm_tf.LSTM {layer.name!r}: {'; '.join(reasons)}: {op} cannot express this "
        "call, so the conversion keeps the step loop for it (TFLite: a WHILE op, and Flex "
        "ops unless lowered; ONNX: a Loop).", stacklevel=3)


def composite(go_backwards: bool) -> tf.types.experimental.GenericFunction:
    """A new `tf.function` with the attributes of a Keras LSTM for TFLite's converter.

    Its arguments are `(inputs, init_h, init_c, kernel, recurrent_kernel, bias)`;
    it returns `(last_output, outputs, h, c, 0)` as `lstm_tf.fused.run` computes
    them (inference), outputs in the order the steps were read.
    """
    attributes = {"api_implements": f"lstm_{uuid.uuid4()}", "time_major": False,
                  "go_backwards": go_backwards}

    def lstm(inputs, init_h, init_c, kernel, recurrent_kernel, bias):  # noqa: ANN001, ANN202
        last_output, outputs, (h, c) = fused_lib.run(
            inputs, kernel, recurrent_kernel, bias, go_backwards, [init_h, init_c],
            None, zero_output_for_mask=False, training=False, final_cell=False)
        return last_output, outputs, h, c, tf.constant(0.0)

    return tf.function(lstm, autograph=False, experimental_attributes=attributes)


def _weights_and_state(layer: Any, initial_state: list) -> tuple:
    """`(kernel, recurrent_kernel, bias, h0, c0)` of a call, as tensors (bias: zeros
    without one)."""
    cell = layer.cell
    kernel = tf.convert_to_tensor(cell.kernel)
    recurrent_kernel = tf.convert_to_tensor(cell.recurrent_kernel)
    bias = (tf.convert_to_tensor(cell.bias) if cell.use_bias
            else tf.zeros([4 * cell.units], kernel.dtype))
    h0, c0 = (tf.convert_to_tensor(s) for s in initial_state)
    return kernel, recurrent_kernel, bias, h0, c0


def run(layer: Any, sequences: tf.Tensor, initial_state: list[tf.Tensor],
        final_cell_state: bool) -> tuple:
    """`layer`'s unmasked inference over `sequences` through `composite`.

    Returns `(last_output, outputs, [h, c])` like `keras.layers.RNN.inner_loop`;
    with `final_cell_state`, c is rebuilt from the outputs (see the module
    docstring), else it is the function's own (which TFLite leaves as zeros).
    """
    kernel, recurrent_kernel, bias, h0, c0 = _weights_and_state(layer, initial_state)
    # TFLite's fused op writes its final state into its state operands, which it
    # keeps between invocations if they are constants (the default zero state)
    # and which are the caller's tensors if they are inputs. So it gets fresh
    # copies: h_0 and C_0 plus zeros computed from the input (x * 0, which the
    # converter cannot fold: it is not 0 for x = inf or NaN), scaled by numbers
    # of this call alone (the converter refuses one tensor as the state of two ops).
    zero = tf.reduce_sum(sequences[:, :1, :1], axis=[1, 2])[:, None] * 0.0
    k = float(next(_calls))
    state = [h0 + zero * (2 * k + 1), c0 + zero * (2 * k + 2)]
    last_output, outputs, _, c, _ = composite(layer.go_backwards)(
        sequences, *state, kernel, recurrent_kernel, bias)
    # (A function's outputs have the shapes of its trace; the call's are known here.)
    shape = sequences.shape[:2].concatenate([layer.cell.units])
    outputs, last_output, c = (fused_lib.with_shape(t, s) for t, s in (
        (outputs, shape), (last_output, shape[::2]), (c, shape[::2])))
    if final_cell_state:
        read = tf.reverse(sequences, [1]) if layer.go_backwards else sequences
        c = final_cell(read, outputs, h0, c0, kernel, recurrent_kernel, bias)
    return last_output, outputs, [last_output, c]


def final_cell(x: tf.Tensor, outputs: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor,
               kernel: tf.Tensor, recurrent_kernel: tf.Tensor, bias: tf.Tensor,
               lengths: tf.Tensor | None = None) -> tf.Tensor:
    """C_T of an LSTM from its inputs and every output h_t, without a loop.

    Args:
        x: `[B, T, D]` the inputs in the order they were read.
        outputs: `[B, T, M]` h_1 .. h_T.
        h0, c0: `[B, M]` the initial state.
        kernel, recurrent_kernel, bias: the weights (gate order i, f, c, o).
        lengths: optional `[B]`, the real steps of right-padded sequences: then
            C after each sequence's last real step.

    Returns:
        `[B, M]`, C_T (C_0 if there are no steps).
    """
    h_prev = tf.concat([h0[:, None], outputs], axis=1)[:, :-1]  # (also for no steps)
    z = tf.matmul(x, kernel) + tf.matmul(h_prev, recurrent_kernel) + bias
    z_i, z_f, z_c, _ = tf.split(z, 4, axis=-1)
    log_f = tf.math.log(tf.sigmoid(z_f))
    written = tf.sigmoid(z_i) * tf.tanh(z_c)
    if lengths is not None:  # padding: f = 1, nothing written
        real = tf.sequence_mask(lengths, tf.shape(x)[1])[:, :, None]
        log_f = tf.where(real, log_f, tf.zeros_like(log_f))
        written = tf.where(real, written, tf.zeros_like(written))
    # Σ_{s>t} log f_s for every t, and Σ_t log f_t.
    after = tf.cumsum(log_f, axis=1, exclusive=True, reverse=True)
    return (tf.exp(tf.reduce_sum(log_f, axis=1)) * c0
            + tf.reduce_sum(tf.exp(after) * written, axis=1))


_ONNX = contextvars.ContextVar("lstm_tf_onnx_graph", default=False)


@contextlib.contextmanager
def onnx_graph() -> Iterator[None]:
    """Inside, `lstm_tf.LSTM` traces its inference calls as the loop tf2onnx turns into ONNX's
    `LSTM` op (see the module docstring); trace (or convert) the model inside it.

    A mask becomes the op's `sequence_lens` (its count of True): masks must be
    right-padded (real steps first) for the ONNX model to compute what the layer does.
    """
    token = _ONNX.set(True)
    try:
        yield
    finally:
        _ONNX.reset(token)


def in_onnx_graph() -> bool:
    return _ONNX.get()


def to_onnx(function: Callable[..., Any], input_signature: list[tf.TensorSpec],
            opset: int = 17) -> Any:
    """An ONNX model (`onnx.ModelProto`) of `function` (a Keras model or a Python function
    of tensors) by tf2onnx, with every `lstm_tf.LSTM` as ONNX's `LSTM` op.

    Needs tf2onnx (`pip install 'lstm_tf[deploy]'`); `function` is traced anew here.
    """
    import tf2onnx  # an optional dependency: only for ONNX

    traced = tf.function(lambda *args: function(*args), input_signature=input_signature)
    # (tf2onnx logs its progress, and that a backward LSTM it could not pair with a
    # forward one into a bidirectional op stays on its own: both are fine here.)
    log = logging.getLogger("tf2onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with onnx_graph():
            proto, _ = tf2onnx.convert.from_function(traced, input_signature=input_signature,
                                                     opset=opset)
    finally:
        log.setLevel(level)
    return proto


def run_onnx(layer: Any, sequences: tf.Tensor, initial_state: list[tf.Tensor],
             mask: Any) -> tuple:
    """`layer`'s inference over `sequences` as the loop tf2onnx rewrites (`onnx_graph()`).

    A mask must be right-padded (the op's `sequence_lens`). Returns
    `(last_output, outputs, [h, c])` like `keras.layers.RNN.inner_loop`; the
    final state comes from the outputs, so that nothing else reads the loop.
    """
    kernel, recurrent_kernel, bias, h0, c0 = _weights_and_state(layer, initial_state)
    steps = tf.shape(sequences)[1]
    lengths = (tf.fill(tf.shape(sequences)[:1], steps) if mask is None
               else tf.reduce_sum(tf.cast(mask, tf.int32), axis=1))
    x = tf.reverse_sequence(sequences, lengths, 1, 0) if layer.go_backwards else sequences
    h_seq = _onnx_loop(x, lengths, h0, c0, kernel, recurrent_kernel, bias)
    # h after each sequence's last real step (h_0 for an empty one).
    pick = tf.one_hot(lengths, steps + 1, dtype=h_seq.dtype)[:, :, None]
    h_last = tf.reduce_sum(pick * tf.concat([h0[:, None], h_seq], axis=1), axis=1)
    c_last = final_cell(x, h_seq, h0, c0, kernel, recurrent_kernel, bias, lengths)
    last_output, outputs = fused_lib.keras_outputs(
        h_seq, h_last, None if mask is None else lengths, layer.go_backwards,
        layer.zero_output_for_mask)
    return last_output, outputs, [h_last, c_last]


def _onnx_loop(x: tf.Tensor, lengths: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor,
               kernel: tf.Tensor, recurrent_kernel: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """`[B, T, M]` h_t of every step (0 past each length), as the loop tf2onnx recognises.

    (Keras 2's `standard_lstm` with TF1's sequence-length `Select`s: the ops and
    their order are what tf2onnx's `lstm_tf2_rewriter` matches.)
    """
    steps = tf.shape(x)[1]
    inputs = tf.TensorArray(x.dtype, size=steps).unstack(tf.transpose(x, [1, 0, 2]))
    outputs = tf.TensorArray(x.dtype, size=steps)

    def body(t, h, c, outputs):  # noqa: ANN001, ANN202
        z = tf.matmul(inputs.read(t), kernel) + tf.matmul(h, recurrent_kernel)
        z_i, z_f, z_c, z_o = tf.split(tf.nn.bias_add(z, bias), 4, axis=1)
        c_new = tf.sigmoid(z_f) * c + tf.sigmoid(z_i) * tf.tanh(z_c)
        h_new = tf.sigmoid(z_o) * tf.tanh(c_new)
        done = tf.greater_equal(t, lengths)  # rows: tf.compat.v1.where selects whole rows
        output = tf.compat.v1.where(done, tf.zeros_like(h_new), h_new)
        h_new = tf.compat.v1.where(done, h, h_new)
        c_new = tf.compat.v1.where(done, c, c_new)
        return t + 1, h_new, c_new, outputs.write(t, output)

    _, _, _, outputs = tf.while_loop(lambda t, *_: t < steps, body, [0, h0, c0, outputs])
    return tf.transpose(outputs.stack(), [1, 0, 2])
