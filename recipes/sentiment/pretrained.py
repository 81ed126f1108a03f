"""A sentiment model started from a language model: `--config.init_from=LM_WORKDIR`.

The language model (`configs/language_model.py:imdb`) reads IMDB text tokenized
as this recipe tokenizes it, so the two share words: the run's vocabulary is the
language model's (its most frequent words, `<eos>` left out), the embedding of
each word is the language model's, and so are the forward LSTM's weights (with
`config.normalize_embeddings`, its input weights rescaled to the normalized rows). The
backward LSTM starts at random, or, with `--config.init_backward_from=LM_WORKDIR`,
from a backward language model (`configs/language_model.py:imdb_backward`: the
same text read backwards, on the forward model's embedding, kept fixed, so both
LSTMs read the one embedding they share here). Then all of it is fine-tuned on
the labelled reviews (Dai & Le 2015), the language models' weights at
`config.pretrained_lr_scale` times the learning rate of the new ones
(`optimizer`: ULMFiT's discriminative learning rates, Howard & Ruder 2018).
"""

from __future__ import annotations

import pathlib
from typing import Any

import keras
import numpy as np
from keras.optimizers.schedules import LearningRateSchedule

from recipes.common import language_models
from recipes.common.errors import RecipeError
from recipes.sentiment import model as models

EOS = "<eos>"  # the language model's line end: no review's token


def language_model(config: Any, backward: bool = False) -> tuple[pathlib.Path, Any, list[str]]:
    """The finished language model run `config.init_from` (`backward`:
    `config.init_backward_from`): path, config, vocabulary.

    `RecipeError` if it is missing or does not fit `config` (tokenization, sizes, direction).
    """
    flag, variant = ("init_backward_from", "imdb_backward") if backward else ("init_from", "imdb")
    made_by = f"--config=configs/language_model.py:{variant}"
    try:
        path, lm_config, vocab = language_models.finished_run(config[flag])
    except RecipeError as e:
        raise RecipeError(f"--config.{flag}={config[flag]}: {e} (make one: python -m "
                          f"recipes.language_model --workdir=DIR {made_by})") from None
    if lm_config.level != "word" or lm_config.get("standardize") != "sentiment":
        raise RecipeError(
            f"--config.{flag}={config[flag]}: that language model does not tokenize as "
            f"this recipe (train it with {made_by})")
    if lm_config.get("reverse", False) != backward:
        raise RecipeError(
            f"--config.{flag}={config[flag]}: that language model reads "
            f"{'forwards' if backward else 'backwards'} (train it with {made_by})")
    if config.split != "whitespace" or config.ngrams != 1:
        raise RecipeError("--config.init_from needs --config.split=whitespace and "
                          "--config.ngrams=1 (the language model's words)")
    for ours, theirs in (("embedding_dim", "embedding_dim"), ("lstm_units", "units")):
        if config[ours] != lm_config[theirs]:
            raise RecipeError(
                f"--config.{ours}={config[ours]}, but the language model in {path} has "
                f"{theirs}={lm_config[theirs]}: set --config.{ours}={lm_config[theirs]}")
    return path, lm_config, vocab


def vocabulary(lm_vocab: list[str], vocab_size: int) -> list[str]:
    """This run's words (ids 2, 3, ...): the language model's most frequent ones."""
    return [token for token in lm_vocab if token != EOS][:vocab_size - 2]


@keras.saving.register_keras_serializable(package="recipes.sentiment")
class DiscriminativeAdam(keras.optimizers.Adam):
    """Adam at `factor * learning_rate` for the variables whose `path` is in `scales`.

    Args:
        scales: `{path: factor}`; the other variables get the learning rate itself.
        **kwargs: `keras.optimizers.Adam`'s arguments.
    """

    def __init__(self, scales: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scales = dict(scales or {})

    def build(self, variables: list[keras.Variable]) -> None:
        super().build(variables)
        # (update_step gets the backend's variables, without `path`: index them as Adam does)
        self.factors = [self.scales.get(v.path, 1.0) for v in variables]

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        factor = self.factors[self._get_variable_index(variable)]
        super().update_step(gradient, variable, learning_rate * factor)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scales": self.scales}


def optimizer(model: keras.Model, config: Any,
              learning_rate: float | LearningRateSchedule) -> keras.optimizers.Optimizer:
    """Adam at `learning_rate` (`train.learning_rate`); with `config.init_from`, the weights
    the language models give (embedding, first forward LSTM; the backward one with
    `config.init_backward_from`) at `config.pretrained_lr_scale` times that rate; with
    `config.model="bilstm_ngrams"`, the n-gram weights at `config.ngrams_lr_scale` times it."""
    scales = {}
    if config.init_from and config.pretrained_lr_scale != 1.0:
        embedding, first = models.first_layers(model)
        pretrained = [embedding, first.forward_layer]
        if config.init_backward_from:
            pretrained.append(first.backward_layer)
        scales.update({v.path: config.pretrained_lr_scale
                       for layer in pretrained for v in layer.weights})
    if config.model == "bilstm_ngrams" and config.ngrams_lr_scale != 1.0:
        scales.update({v.path: config.ngrams_lr_scale
                       for v in model.get_layer("ngrams").weights})
    if not scales:
        return keras.optimizers.Adam(learning_rate, clipnorm=config.clipnorm)
    return DiscriminativeAdam(scales, learning_rate=learning_rate, clipnorm=config.clipnorm)


def initialize(model: keras.Model, config: Any, vocab: list[str]) -> None:
    """Sets `model`'s embedding and first forward LSTM to the language model's weights (and,
    with `config.init_backward_from`, its first backward LSTM to the backward one's).

    `vocab`: this run's words (id k + 2 is `vocab[k]`; id 1 the unknown word,
    the language model's id 0; id 0 padding, zeros).
    """
    path, lm_config, lm_vocab = language_model(config)
    lm = language_models.trained_step_model(lm_config, lm_vocab, path)
    lm_ids = {token: k + 1 for k, token in enumerate(lm_vocab)}
    missing = [t for t in vocab if t not in lm_ids]
    if missing:
        raise RecipeError(f"this run's vocabulary has words the language model in {path} "
                          f"lacks ({missing[:3]}): it was not built from that model")
    (lm_embedding,) = lm.get_layer("embedding").get_weights()
    layer, first = models.first_layers(model)
    table = models.embedding_table(layer)
    embedding = table.numpy()  # (rows past the vocabulary stay as they are)
    rows = [0] + [lm_ids[t] for t in vocab]
    embedding[1:len(rows) + 1] = lm_embedding[rows]
    embedding[0] = 0.0  # padding (masked)
    table.assign(embedding)
    first.forward_layer.set_weights(lm.get_layer("lstm0").get_weights())
    started = [first.forward_layer]
    if config.init_backward_from:
        path, lm_config, backward_vocab = language_model(config, backward=True)
        backward = language_models.trained_step_model(lm_config, backward_vocab, path)
        (backward_embedding,) = backward.get_layer("embedding").get_weights()
        if backward_vocab != lm_vocab or not np.array_equal(backward_embedding, lm_embedding):
            raise RecipeError(
                f"--config.init_backward_from={config.init_backward_from}: that language "
                "model's embedding is not the one of --config.init_from (train it with "
                f"--config.embedding_from={config.init_from})")
        first.backward_layer.set_weights(backward.get_layer("lstm0").get_weights())
        started.append(first.backward_layer)
    if isinstance(layer, models.NormalizedEmbedding):
        _undo_normalization(layer, started)


def _undo_normalization(embedding: models.NormalizedEmbedding, lstms: list[Any]) -> None:
    """Rescales the input weights of `lstms` so that they compute on the normalized rows
    (v − μ)/σ what the language model computed on the rows v: with W' = diag(σ)·W and
    b' = b + μ·W, x·W' + b' = v·W + b for every token. The language model's LSTMs start
    from exactly their trained function."""
    table = np.asarray(embedding.table.numpy(), np.float64)
    weights = np.asarray(embedding.frequencies.numpy(), np.float64)
    weights /= weights.sum()
    mean = weights @ table
    scale = np.sqrt(weights @ (table - mean) ** 2 + 1e-6)
    for lstm in lstms:
        kernel = np.asarray(lstm.cell.kernel.numpy(), np.float64)
        lstm.cell.bias.assign((lstm.cell.bias.numpy() + mean @ kernel).astype(np.float32))
        lstm.cell.kernel.assign((scale[:, None] * kernel).astype(np.float32))
