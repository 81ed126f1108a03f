"""Adversarial and virtual adversarial training on the embeddings (Miyato, Dai & Goodfellow,
ICLR 2017), in Keras `fit`: `training_model(model, config)`.

With e the embedding layer's outputs (one vector per token) and ‖·‖ the L2 norm over all
the real (unmasked) tokens of one sequence:

* adversarial: r = ε·g/‖g‖, g = ∇_e loss(e) (a constant: no gradient through it); the
  loss gains `adversarial_weight` × loss(e + r);
* virtual adversarial: d = ξ·u/‖u‖ from a random normal u, g = ∇_d KL(p(e) ‖ p(e + d))
  (one power iteration), r = ε·g/‖g‖; the loss gains `virtual_adversarial_weight` ×
  KL(p(e) ‖ p(e + r)), p(e) a constant, on the labelled batch and (with an unlabelled
  split) the unlabelled batch beside it. It needs no labels.

Perturbations are zero at masked steps. `AdversarialTraining` is a second Keras model on
the classifier's own layers (the same variables, weights files and checkpoints); only its
`train_step` differs, so exports, `explain` and deployed models are the classifier's alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from recipes.sentiment import model as models

Probability = Callable[[tf.Tensor], tf.Tensor]
TERMS = ("adversarial_loss", "virtual_adversarial_loss")


def unit_per_sequence(x: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """`x` `[batch, time, features]` zeroed at masked steps, over its L2 norm per sequence
    (the real steps' features together); 0 where that norm is 0."""
    x = x * tf.cast(mask, x.dtype)[..., None]
    # Scaled by the largest entry first: the squares of a small gradient would underflow.
    peak = tf.reduce_max(tf.abs(x), axis=(1, 2), keepdims=True)
    x = tf.math.divide_no_nan(x, peak)
    return tf.math.divide_no_nan(x, tf.norm(x, axis=(1, 2), keepdims=True))


def adversarial_perturbation(gradient: tf.Tensor, mask: tf.Tensor, epsilon: float) -> tf.Tensor:
    """r = ε·g/‖g‖ per sequence over its real steps, from the loss gradient g w.r.t. the
    embedding outputs."""
    return epsilon * unit_per_sequence(tf.stop_gradient(gradient), mask)


def divergence(p: tf.Tensor, q: tf.Tensor,
               sample_weight: tf.Tensor | None = None) -> tf.Tensor:
    """Mean KL(p ‖ q) of Bernoulli distributions given by P(positive) `[batch, 1]`
    (`keras.losses.KLDivergence` on [1 − p, p]: Keras's reduction, also across replicas),
    weighted by `sample_weight` `[batch]` (default: all rows alike)."""
    return keras.losses.KLDivergence(reduction="mean_with_sample_weight")(
        tf.concat([1 - p, p], -1), tf.concat([1 - q, q], -1), sample_weight=sample_weight)


def virtual_adversarial_perturbation(probability_of: Probability, embedded: tf.Tensor,
                                     mask: tf.Tensor, target: tf.Tensor, epsilon: float,
                                     xi: float, direction: tf.Tensor,
                                     sample_weight: tf.Tensor | None = None) -> tf.Tensor:
    """r = ε·g/‖g‖, g = ∇_d KL(target ‖ p(embedded + d)) at d = ξ·u/‖u‖ (`direction` u):
    one power iteration towards the direction the prediction changes most in."""
    d = xi * unit_per_sequence(direction, mask)
    with tf.GradientTape() as tape:
        tape.watch(d)
        kl = divergence(target, probability_of(tf.stop_gradient(embedded) + d), sample_weight)
    return adversarial_perturbation(tape.gradient(kl, d), mask, epsilon)


def _sum(parts: tuple[Any, ...]) -> Any:
    """The sum of one variable's gradients from several tapes (None: not connected)."""
    present = [g for g in parts if g is not None]
    if len(present) < 2:
        return present[0] if present else None
    return tf.add_n([tf.convert_to_tensor(g) for g in present])  # (IndexedSlices: dense)


def _padded_to(ids: tf.Tensor, time: tf.Tensor) -> tf.Tensor:
    return tf.pad(ids, [[0, 0], [0, time - tf.shape(ids)[1]]])


class AdversarialTraining(keras.Model):
    """The functional `model` with the adversarial losses added in `train_step`.

    Built on `model`'s inputs and outputs, so it has `model`'s layers and weights (and
    weights files any `model` of that config loads). Training data: `(tokens, label)`, or
    `({"tokens": tokens, "unlabeled": unlabelled tokens}, label)` for the virtual
    adversarial loss on unlabelled text too. Logs `adversarial_loss` and
    `virtual_adversarial_loss` (their weighted terms); `loss` is their sum with the
    classification loss (the terms that are on). Evaluation is the model's own.
    """

    def __init__(self, model: keras.Model, adversarial_epsilon: float = 0.0,
                 virtual_adversarial_epsilon: float = 0.0, adversarial_weight: float = 1.0,
                 virtual_adversarial_weight: float = 1.0, xi: float = 0.1,
                 seed: int = 0) -> None:
        super().__init__(model.inputs, model.outputs, name=model.name)
        self.embedding = embedding = models.embedding_layer(model)
        # The model from the embedding's outputs on: its mask still comes from the tokens.
        self.head = keras.Model([model.inputs[0], embedding.output], model.outputs[0])
        self.epsilon, self.virtual_epsilon = adversarial_epsilon, virtual_adversarial_epsilon
        self.weight, self.virtual_weight = adversarial_weight, virtual_adversarial_weight
        self.xi, self.seed = xi, seed
        on = (adversarial_epsilon > 0, virtual_adversarial_epsilon > 0)
        self.trackers = {name: keras.metrics.Mean(name=name)
                         for name, logged in zip(TERMS, on, strict=True) if logged}

    def embedded(self, tokens: tf.Tensor) -> tf.Tensor:
        """The embedding's outputs, without the Keras mask they carry (the head computes the
        mask from the tokens)."""
        return tf.identity(self.embedding(tokens))

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if isinstance(inputs, dict):  # training batches with unlabelled tokens
            inputs = inputs["tokens"]
        return super().call(inputs, training=training, mask=mask)

    def adversarial_losses(self, tokens: tf.Tensor, labels: tf.Tensor,
                           unlabeled: tf.Tensor | None = None, training: bool = True,
                           direction: tf.Tensor | None = None,
                           sample_weight: tf.Tensor | None = None,
                           ) -> tuple[dict[str, tf.Tensor], list[Any]]:
        """The losses of one batch, and the gradients of their sum w.r.t.
        `trainable_variables`.

        `sample_weight` `[batch]`: 1 for the batch's real rows, 0 for the rows filling it up
        (default: all real); the losses are means over the real rows.

        Losses: `loss` (the compiled one), `adversarial_loss`, `virtual_adversarial_loss`
        (weighted; 0 when off); also `probability` (clean) and the perturbations
        `adversarial_r`, `virtual_adversarial_r` (of the batch's tokens, then of the
        unlabelled ones). `direction`: the power iteration's start (default: normal,
        seeded by the step). Each forward pass has a tape of its own, one after another:
        tapes inside tapes would make TensorFlow build higher-order gradients, which the
        LSTM's `tf.cond` cannot.
        """
        variables = self.trainable_variables
        mask = tf.not_equal(tokens, 0)

        def gradients(loss: tf.Tensor, tape: tf.GradientTape, *tensors: tf.Tensor) -> Any:
            return tape.gradient(self.optimizer.scale_loss(loss), [variables, *tensors])

        with tf.GradientTape() as tape:
            embedded = self.embedded(tokens)
            tape.watch(embedded)
            probability = self.head([tokens, embedded], training=training)
            loss = self.compute_loss(x=tokens, y=labels, y_pred=probability,
                                     sample_weight=sample_weight)
        clean, gradient = gradients(loss, tape, embedded)
        out = {"probability": probability, "loss": loss}
        out["adversarial_loss"] = out["virtual_adversarial_loss"] = tf.zeros_like(loss)
        parts = [clean]
        if self.epsilon > 0:
            r = adversarial_perturbation(gradient, mask, self.epsilon)
            with tf.GradientTape() as tape:
                perturbed = self.head([tokens, self.embedded(tokens) + r], training=training)
                term = self.weight * keras.losses.BinaryCrossentropy(
                    reduction="mean_with_sample_weight")(labels, perturbed, sample_weight)
            parts.append(gradients(term, tape)[0])
            out["adversarial_r"], out["adversarial_loss"] = r, term
        if self.virtual_epsilon > 0:
            target = probability  # (computed outside any tape: a constant)
            if unlabeled is not None:  # the labelled and the unlabelled sequences together
                time = tf.maximum(tf.shape(tokens)[1], tf.shape(unlabeled)[1])
                other = self.head([unlabeled, self.embedded(unlabeled)], training=training)
                tokens = tf.concat([_padded_to(tokens, time), _padded_to(unlabeled, time)], 0)
                target = tf.concat([target, other], 0)
                mask = tf.not_equal(tokens, 0)
                if sample_weight is not None:
                    sample_weight = tf.concat(
                        [sample_weight, tf.ones_like(other[:, 0], sample_weight.dtype)], 0)
            embedded = self.embedded(tokens)
            if direction is None:
                step = tf.cast(self.optimizer.iterations, tf.int32)
                direction = tf.random.stateless_normal(tf.shape(embedded), [self.seed, step])

            def probability_of(x: tf.Tensor) -> tf.Tensor:
                return self.head([tokens, x], training=training)

            r = virtual_adversarial_perturbation(probability_of, embedded, mask, target,
                                                 self.virtual_epsilon, self.xi, direction,
                                                 sample_weight)
            with tf.GradientTape() as tape:
                term = self.virtual_weight * divergence(
                    target, probability_of(self.embedded(tokens) + r), sample_weight)
            parts.append(gradients(term, tape)[0])
            out["virtual_adversarial_r"], out["virtual_adversarial_loss"] = r, term
        return out, [_sum(g) for g in zip(*parts, strict=True)]

    def train_step(self, data: Any) -> dict[str, Any]:
        x, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        tokens, unlabeled = (x["tokens"], x["unlabeled"]) if isinstance(x, dict) else (x, None)
        out, gradients = self.adversarial_losses(tokens, labels, unlabeled,
                                                 sample_weight=sample_weight)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables, strict=True))
        # Keras's losses are divided by the number of replicas (their gradients add up);
        # the logged means are per example.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        batch = tf.shape(tokens)[0] if sample_weight is None else tf.reduce_sum(sample_weight)
        total = out["loss"] + sum(out[name] for name in TERMS)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(total * replicas, sample_weight=batch)
        for name, tracker in self.trackers.items():
            tracker.update_state(out[name] * replicas, sample_weight=batch)
        return self.compute_metrics(tokens, labels, out["probability"],
                                    sample_weight=sample_weight)

    def test_step(self, data: Any) -> dict[str, Any]:
        logs = super().test_step(data)
        return {k: v for k, v in logs.items() if k not in TERMS}


def enabled(config: Any) -> bool:
    return config.adversarial_epsilon > 0 or config.virtual_adversarial_epsilon > 0


def training_model(model: keras.Model, config: Any) -> keras.Model:
    """`model` itself, or with `config.adversarial_epsilon` or
    `config.virtual_adversarial_epsilon` > 0 an `AdversarialTraining` of it."""
    if not enabled(config):
        return model
    return AdversarialTraining(
        model, config.adversarial_epsilon, config.virtual_adversarial_epsilon,
        config.adversarial_weight, config.virtual_adversarial_weight,
        config.virtual_adversarial_xi, config.seed)
