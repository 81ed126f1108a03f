"""`LSTMCell`: one time step of a long short-term memory network."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

# The mixin that gives a cell variational dropout (one mask per sequence,
# reused at every step) and lets `keras.layers.RNN` prepare the masks before
# its loop. Keras's own cells use it; it is not exported under `keras.layers`.
from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell


@keras.saving.register_keras_serializable(package="lstm_tf")
class LSTMCell(keras.layers.Layer, DropoutRNNCell):
    """One step of an LSTM, written as its four parts.

    With z = x_t·W + h_{t-1}·U + b split into four blocks in the order
    (i, f, c, o), the cell computes

        f_t = σ(z_f)                     forget gate
        i_t = σ(z_i), C̃_t = tanh(z_c)    input gate and candidate
        C_t = f_t ⊙ C_{t-1} + i_t ⊙ C̃_t   cell update
        o_t = σ(z_o), h_t = o_t ⊙ tanh(C_t)  output gate and new hidden state

    where σ is `recurrent_activation` and tanh is `activation`. The weights are
    laid out exactly like `keras.layers.LSTMCell`: `kernel` W is
    `(input_dim, 4 * units)`, `recurrent_kernel` U is `(units, 4 * units)`,
    `bias` b is `(4 * units,)`, gate blocks in the order i, f, c, o.

    Args:
        units: Positive integer, size of the hidden state h and cell state C.
        activation: Activation of the candidate and of the cell output.
            Default `"tanh"`.
        recurrent_activation: Activation of the three gates. Default
            `"sigmoid"`.
        use_bias: Whether to add the bias b. Default `True`.
        kernel_initializer: Initializer for W. Default `"glorot_uniform"`.
        recurrent_initializer: Initializer for U. Default `"orthogonal"`.
        bias_initializer: Initializer for b. Default `"zeros"`.
        unit_forget_bias: If `True` (default), add 1 to the forget-gate bias
            at initialization (Jozefowicz et al., 2015).
        kernel_regularizer, recurrent_regularizer, bias_regularizer:
            Optional regularizers of W, U and b.
        kernel_constraint, recurrent_constraint, bias_constraint:
            Optional constraints of W, U and b.
        chrono_max_delay: If set to T_max > 2, "chrono" initialization (Tallec &
            Ollivier, 2018): forget-gate bias b_f ~ log(U[1, T_max - 1]) and
            input-gate bias b_i = -b_f, for dependencies up to ~T_max steps.
            Replaces `bias_initializer` and `unit_forget_bias` on those blocks.
        dropout: Fraction of the inputs x_t to drop. Variational: one mask per
            sequence, the same at every step, and only when training.
        recurrent_dropout: Fraction of h_{t-1} to drop, likewise variational.
        seed: Seed of the dropout and zoneout masks.
        use_peepholes: Diagonal peephole connections (Gers & Schmidhuber, 2000),
            as TF-Addons' `PeepholeLSTMCell`: z_i += w_ci ⊙ C_{t-1},
            z_f += w_cf ⊙ C_{t-1} and z_o += w_co ⊙ C_t (weights
            `input_gate_peephole_weights`, ... of shape `(units,)`).
        layer_norm: Layer normalization (Ba et al., 2016), as TF-Addons'
            `LayerNormLSTMCell`: z = LN(x_t·W) + LN(h_{t-1}·U) + b (each over all
            4·units pre-activations) and C_t = LN(f_t ⊙ C_{t-1} + i_t ⊙ C̃_t),
            each with its gain and bias (sublayers `kernel_norm`,
            `recurrent_norm`, `state_norm`; epsilon `norm_epsilon`).
        norm_epsilon: The layer normalizations' epsilon (default 1e-3, TF-Addons').
        proj_size: The projected LSTM (LSTMP, Sak et al., 2014): h_t =
            (o_t ⊙ tanh C_t)·W_hr, of size `proj_size` (`projection_kernel`
            `(units, proj_size)`; U is then `(proj_size, 4 * units)`), the
            function of `torch.nn.LSTM(proj_size=...)`.
        zoneout_h, zoneout_c: Zoneout (Krueger et al., 2017): in training each
            unit of h (of C) keeps its previous value with this probability, a
            new draw at every step; at inference the expectation,
            z·h_{t-1} + (1 - z)·h_t.

    Call arguments:
        inputs: `(batch, input_dim)`, x_t.
        states: `[h_{t-1}, C_{t-1}]`, each `(batch, units)`.
        training: Whether dropout applies.

    Returns:
        `(h_t, [h_t, C_t])`.

    Example:

    >>> cell = LSTMCell(4)
    >>> layer = keras.layers.RNN(cell)
    >>> layer(np.ones((2, 3, 5))).shape
    TensorShape([2, 4])
    """

    def __init__(
        self,
        units: int,
        activation: Any = "tanh",
        recurrent_activation: Any = "sigmoid",
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        recurrent_initializer: Any = "orthogonal",
        bias_initializer: Any = "zeros",
        unit_forget_bias: bool = True,
        kernel_regularizer: Any = None,
        recurrent_regularizer: Any = None,
        bias_regularizer: Any = None,
        kernel_constraint: Any = None,
        recurrent_constraint: Any = None,
        bias_constraint: Any = None,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        seed: int | None = None,
        chrono_max_delay: int | None = None,
        use_peepholes: bool = False,
        layer_norm: bool = False,
        norm_epsilon: float = 1e-3,
        proj_size: int | None = None,
        zoneout_h: float = 0.0,
        zoneout_c: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(units, int) or units <= 0:
            raise ValueError(f"`units` must be a positive integer; got {units!r}.")
        for name, rate in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1); got {rate!r}.")
        if chrono_max_delay is not None and chrono_max_delay <= 2:
            raise ValueError(f"`chrono_max_delay` must be > 2; got {chrono_max_delay!r}.")
        if proj_size is not None and (not isinstance(proj_size, int) or proj_size <= 0):
            raise ValueError(f"`proj_size` must be a positive integer; got {proj_size!r}.")
        for name, rate in (("zoneout_h", zoneout_h), ("zoneout_c", zoneout_c)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1]; got {rate!r}.")
        super().__init__(**kwargs)
        self.units = units
        self.chrono_max_delay = chrono_max_delay
        self.activation = keras.activations.get(activation)
        self.recurrent_activation = keras.activations.get(recurrent_activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.unit_forget_bias = unit_forget_bias
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = keras.regularizers.get(recurrent_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.recurrent_constraint = keras.constraints.get(recurrent_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.dropout = float(dropout)
        self.recurrent_dropout = float(recurrent_dropout)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed=seed)
        self.inference_call = False  # `lstm_tf.LSTM` sets it: no dropout masks are drawn
        self.use_peepholes = use_peepholes
        self.layer_norm = layer_norm
        self.norm_epsilon = norm_epsilon
        self.proj_size = proj_size
        self.zoneout_h = float(zoneout_h)
        self.zoneout_c = float(zoneout_c)
        hidden = proj_size or units
        self.state_size = [hidden, units]
        self.output_size = hidden
        if layer_norm:
            norm = {"epsilon": norm_epsilon, "dtype": self.dtype_policy}
            self.kernel_norm = keras.layers.LayerNormalization(name="kernel_norm", **norm)
            self.recurrent_norm = keras.layers.LayerNormalization(name="recurrent_norm", **norm)
            self.state_norm = keras.layers.LayerNormalization(name="state_norm", **norm)

    def build(self, input_shape: tuple) -> None:
        input_dim = input_shape[-1]
        self.kernel = self.add_weight(
            shape=(input_dim, 4 * self.units),
            name="kernel",
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.recurrent_kernel = self.add_weight(
            shape=(self.proj_size or self.units, 4 * self.units),
            name="recurrent_kernel",
            initializer=self.recurrent_initializer,
            regularizer=self.recurrent_regularizer,
            constraint=self.recurrent_constraint,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                shape=(4 * self.units,),
                name="bias",
                initializer=self._initial_bias,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        if self.use_peepholes:
            for gate in ("input", "forget", "output"):
                setattr(self, f"{gate}_gate_peephole_weights", self.add_weight(
                    shape=(self.units,), name=f"{gate}_gate_peephole_weights",
                    initializer=self.kernel_initializer))
        if self.layer_norm:
            self.kernel_norm.build((None, 4 * self.units))
            self.recurrent_norm.build((None, 4 * self.units))
            self.state_norm.build((None, self.units))
        if self.proj_size:
            self.projection_kernel = self.add_weight(
                shape=(self.units, self.proj_size), name="projection_kernel",
                initializer=self.kernel_initializer, regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint)

    @property
    def is_plain(self) -> bool:
        """No variant (peepholes, layer norm, projection, zoneout): the classic LSTM."""
        return not (self.use_peepholes or self.layer_norm or self.proj_size
                    or self.zoneout_h or self.zoneout_c)

    def _initial_bias(self, shape: tuple, dtype: Any = None) -> Any:
        """`bias_initializer`, plus 1 on the forget block if `unit_forget_bias`;
        chrono initialization of the input and forget blocks if `chrono_max_delay`."""
        bias = self.bias_initializer(shape, dtype=dtype)
        n = self.units
        if self.chrono_max_delay is not None:
            b_f = ops.log(keras.random.uniform(
                (n,), 1.0, self.chrono_max_delay - 1.0, dtype=dtype, seed=self.seed))
            return ops.concatenate([-b_f, b_f, bias[2 * n :]], axis=0)
        if self.unit_forget_bias:
            bias = ops.concatenate(
                [bias[:n], bias[n : 2 * n] + 1.0, bias[2 * n :]], axis=0
            )
        return bias

    def get_dropout_mask(self, step_input: Any) -> Any:
        return None if self.inference_call else super().get_dropout_mask(step_input)

    def get_recurrent_dropout_mask(self, step_input: Any) -> Any:
        return (None if self.inference_call
                else super().get_recurrent_dropout_mask(step_input))

    def call(self, inputs: Any, states: list, training: bool = False) -> tuple:
        h_prev, c_prev = states
        h_read = h_prev
        if training and self.dropout > 0:
            inputs = inputs * self.get_dropout_mask(inputs)
        if training and self.recurrent_dropout > 0:
            h_read = h_prev * self.get_recurrent_dropout_mask(h_prev)
        parts = self.step(inputs, h_read, c_prev)
        h = self.zone_out(h_prev, parts["hidden"], self.zoneout_h, training)
        c = self.zone_out(c_prev, parts["cell"], self.zoneout_c, training)
        return h, [h, c]

    def step(self, inputs: Any, h_prev: Any, c_prev: Any) -> dict[str, Any]:
        """The four parts of one step, and what they give (before zoneout).

        Args:
            inputs: x_t, `(batch, input_dim)` (after dropout, if any).
            h_prev: h_{t-1}, `(batch, proj_size or units)`.
            c_prev: C_{t-1}, `(batch, units)`.

        Returns:
            `{"forget": f_t, "input": i_t, "candidate": C̃_t, "output": o_t,
            "cell": C_t, "hidden": h_t}`, each `(batch, units)` (h_t:
            `(batch, proj_size)` with a projection).
        """
        # All four pre-activations at once: z = x_t·W + h_{t-1}·U + b.
        x_w = ops.matmul(inputs, self.kernel)
        h_u = ops.matmul(h_prev, self.recurrent_kernel)
        if self.layer_norm:
            x_w, h_u = self.kernel_norm(x_w), self.recurrent_norm(h_u)
        z = x_w + h_u
        if self.use_bias:
            z = z + self.bias
        z_i, z_f, z_c, z_o = ops.split(z, 4, axis=-1)
        if self.use_peepholes:  # the input and forget gates see C_{t-1}
            z_i = z_i + self.input_gate_peephole_weights * c_prev
            z_f = z_f + self.forget_gate_peephole_weights * c_prev
        f = self.recurrent_activation(z_f)  # forget gate
        i = self.recurrent_activation(z_i)  # input gate
        c_candidate = self.activation(z_c)  # candidate C̃_t
        c = f * c_prev + i * c_candidate  # cell update
        if self.layer_norm:
            c = self.state_norm(c)
        if self.use_peepholes:  # the output gate sees C_t
            z_o = z_o + self.output_gate_peephole_weights * c
        o = self.recurrent_activation(z_o)  # output gate
        h = o * self.activation(c)
        if self.proj_size:
            h = ops.matmul(h, self.projection_kernel)
        return {"forget": f, "input": i, "candidate": c_candidate, "output": o, "cell": c,
                "hidden": h}

    def gates(self, inputs: Any, h_prev: Any, c_prev: Any = None) -> tuple:
        """The forget gate, input gate, candidate and output gate of one step.

        Args:
            inputs: x_t, `(batch, input_dim)` (after dropout, if any).
            h_prev: h_{t-1}.
            c_prev: C_{t-1} (needed with peepholes; zeros if omitted).

        Returns:
            `(f_t, i_t, C̃_t, o_t)`, each `(batch, units)`.
        """
        if c_prev is None:
            c_prev = ops.zeros((ops.shape(inputs)[0], self.units), dtype=inputs.dtype)
        parts = self.step(inputs, h_prev, c_prev)
        return parts["forget"], parts["input"], parts["candidate"], parts["output"]

    def zone_out(self, previous: Any, new: Any, rate: float, training: bool = False) -> Any:
        """Zoneout of a state: in training each unit keeps its `previous` value with
        probability `rate`; at inference the expectation, rate·previous + (1−rate)·new.
        `new` itself when `rate` is 0."""
        if not rate:
            return new
        if not training:
            return rate * previous + (1.0 - rate) * new
        keep = keras.random.uniform(ops.shape(new), dtype=new.dtype,
                                    seed=self.seed_generator) < rate
        return ops.where(keep, previous, new)

    def get_initial_state(self, batch_size: Any = None) -> list:
        return [ops.zeros((batch_size, size), dtype=self.compute_dtype)
                for size in self.state_size]

    def get_config(self) -> dict:
        ser = keras.saving.serialize_keras_object
        config = {
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "recurrent_activation": keras.activations.serialize(
                self.recurrent_activation
            ),
            "use_bias": self.use_bias,
            "kernel_initializer": ser(self.kernel_initializer),
            "recurrent_initializer": ser(self.recurrent_initializer),
            "bias_initializer": ser(self.bias_initializer),
            "unit_forget_bias": self.unit_forget_bias,
            "kernel_regularizer": ser(self.kernel_regularizer),
            "recurrent_regularizer": ser(self.recurrent_regularizer),
            "bias_regularizer": ser(self.bias_regularizer),
            "kernel_constraint": ser(self.kernel_constraint),
            "recurrent_constraint": ser(self.recurrent_constraint),
            "bias_constraint": ser(self.bias_constraint),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "seed": self.seed,
            "chrono_max_delay": self.chrono_max_delay,
            "use_peepholes": self.use_peepholes,
            "layer_norm": self.layer_norm,
            "norm_epsilon": self.norm_epsilon,
            "proj_size": self.proj_size,
            "zoneout_h": self.zoneout_h,
            "zoneout_c": self.zoneout_c,
        }
        return {**super().get_config(), **config}
