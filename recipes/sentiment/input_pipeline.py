"""IMDB (or any TFDS text-classification dataset) → batches of token ids."""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from recipes.common.data import load_tfds
from recipes.common.distribute import shard_by_data
from recipes.common.errors import RecipeError
from recipes.common.text import standardize


def load_splits(config: Any) -> tuple[tf.data.Dataset, tf.data.Dataset, tf.data.Dataset]:
    """The train, validation and test splits as `(text, label)` pairs."""
    return tuple(load_texts(
        config, [config.train_split, config.validation_split, config.test_split]))


def load_texts(config: Any, splits: list[str]) -> list[tf.data.Dataset]:
    """Splits of the config's dataset as `(text, label)` pairs."""
    datasets = load_tfds(config.dataset, splits, config.data_dir, download=config.download)
    pick = lambda ex: (ex[config.text_feature], ex[config.label_feature])  # noqa: E731
    try:
        return [ds.map(pick) for ds in datasets]
    except KeyError:
        features = list(datasets[0].element_spec)
        raise RecipeError(
            f"--config.text_feature={config.text_feature!r} / --config.label_feature="
            f"{config.label_feature!r} are not features of {config.dataset!r} (it has {features})"
        ) from None


@keras.saving.register_keras_serializable(package="recipes.sentiment")
def split_characters(text: tf.Tensor) -> tf.RaggedTensor:
    """`[batch]` strings → `[batch, (characters)]`: every character a token, spaces dropped."""
    characters = tf.strings.unicode_split(text, "UTF-8")
    return tf.ragged.boolean_mask(
        characters, tf.logical_not(tf.strings.regex_full_match(characters, r"\s")))


SPLITS = {"whitespace": "whitespace", "character": split_characters}


def tokens(text: tf.Tensor, config: Any) -> tf.RaggedTensor:
    """`[batch]` strings → `[batch, (tokens)]`, the strings the vectorizer maps to ids."""
    standardized = standardize(text)
    if config.split == "character":
        pieces = split_characters(standardized)
    else:
        pieces = tf.strings.split(standardized)
    if config.ngrams > 1:  # as TextVectorization: all 1-grams, then all 2-grams, ...
        pieces = tf.strings.ngrams(pieces, tuple(range(1, config.ngrams + 1)), separator=" ")
    return pieces[:, :config.max_length]


def make_vectorizer(config: Any, train: tf.data.Dataset, vocab_file: pathlib.Path,
                    vocabulary: list[str] | None = None) -> keras.layers.TextVectorization:
    """A `TextVectorization` with the training split's vocabulary (or `vocabulary`).

    Splits on whitespace or into characters (`config.split`), with n-grams up to
    `config.ngrams`. The vocabulary is kept in `vocab_file`, so a resumed run
    reuses it.
    """
    vectorizer = keras.layers.TextVectorization(
        max_tokens=config.vocab_size, standardize=standardize, split=SPLITS[config.split],
        ngrams=config.ngrams if config.ngrams > 1 else None, ragged=True)
    if vocab_file.exists():
        vectorizer.set_vocabulary(vocab_file.read_text(encoding="utf-8").split("\n"))
    else:
        if vocabulary is None:
            vectorizer.adapt(train.map(lambda text, label: text).batch(1024))
        else:
            vectorizer.set_vocabulary(vocabulary)
        vocab = vectorizer.get_vocabulary()
        tmp = vocab_file.with_name(vocab_file.name + ".tmp")
        # Index 0 (padding) and 1 ([UNK]) are implied by set_vocabulary.
        tmp.write_text("\n".join(vocab[2:]), encoding="utf-8")
        tmp.replace(vocab_file)
    return vectorizer


def to_ids(vectorizer: keras.layers.TextVectorization, text: tf.Tensor,
           max_length: int) -> tf.Tensor:
    """`[batch]` strings → right-padded `[batch, time]` ids (0 = padding), 1 ≤ time ≤ max_length."""
    return _at_least_one_step(vectorizer(text)[:, :max_length].to_tensor())


def _at_least_one_step(ids: tf.Tensor) -> tf.Tensor:
    """Pads `[batch, 0]` (all texts empty) to `[batch, 1]`, one masked step."""
    return tf.pad(ids, [[0, 0], [0, tf.maximum(0, 1 - tf.shape(ids)[1])]])


def _examples(ds: tf.data.Dataset, vectorizer: keras.layers.TextVectorization, config: Any,
              training: bool, cache: bool = True) -> tf.data.Dataset:
    """`(ids, label)` pairs, cached (unless not `cache`); training drops texts with no
    tokens."""
    ds = ds.map(
        lambda text, label: (vectorizer(text[None])[0, : config.max_length], label),
        num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        ds = ds.filter(lambda ids, label: tf.size(ids) > 0)
    return ds.cache() if cache else ds


def _bucketed(ds: tf.data.Dataset, config: Any, drop_remainder: bool,
              weighted: bool = False) -> tf.data.Dataset:
    """Batches of reviews of similar length, right-padded with 0.

    `weighted`: `(ids, label, weight)` batches of exactly `config.batch_size` rows, a
    bucket's last, partial batch filled up with empty rows of weight 0 (the others 1),
    so that the compiled LSTM loops see one batch size only.
    """
    boundaries = list(range(config.bucket_width, config.max_length + 1, config.bucket_width))
    ds = ds.bucket_by_sequence_length(
        lambda ids, label: tf.size(ids),
        bucket_boundaries=boundaries,
        bucket_batch_sizes=[config.batch_size] * (len(boundaries) + 1),
        pad_to_bucket_boundary=False,
        drop_remainder=drop_remainder)
    if not weighted:
        return ds.map(lambda ids, label: (_at_least_one_step(ids), label))

    def filled(ids: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        missing = config.batch_size - tf.shape(ids)[0]
        weight = tf.pad(tf.ones_like(label, tf.float32), [[0, missing]])
        return (tf.pad(_at_least_one_step(ids), [[0, missing], [0, 0]]),
                tf.pad(label, [[0, missing]]), weight)

    return ds.map(filled)


def batches(ds: tf.data.Dataset, vectorizer: keras.layers.TextVectorization,
            config: Any) -> tf.data.Dataset:
    """Evaluation batches: bucketed, right-padded `(ids, label)`, in a fixed order.

    Their number is counted once and declared (`assert_cardinality`), so that
    Keras knows when an evaluation ends instead of warning that the data "ran out".
    """
    ds = _bucketed(_examples(ds, vectorizer, config, training=False), config, False)
    count = ds.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1)
    ds = ds.apply(tf.data.experimental.assert_cardinality(count))
    return shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def training_batches(ds: tf.data.Dataset, vectorizer: keras.layers.TextVectorization,
                     config: Any, first_epoch: int = 0,
                     unlabeled: tf.data.Dataset | None = None) -> tuple[tf.data.Dataset, int]:
    """Training batches of epochs `first_epoch` .. `config.epochs - 1`, and batches per epoch.

    Each epoch is the examples shuffled (seeded), then bucketed; its order is a
    function of (seed, epoch) alone, so a resumed run, a second replica and a
    second worker all see exactly the batches of an uninterrupted run on one
    device (a shuffle that reshuffles per iterator would depend on how many
    iterators were made: Keras makes an extra one under a distribution
    strategy). Batches are `(ids, label, weight)`, each of `config.batch_size`
    rows: a bucket's last batch is filled up with empty rows of weight 0 (with
    `config.drop_remainder`, it is dropped instead). With `unlabeled` (texts, labels
    ignored), each is `({"tokens": ids, "unlabeled": ids}, label, weight)`: beside
    every labelled batch a batch of unlabelled texts (not filled up), from the
    unlabelled set shuffled by (seed, epoch) as well.
    """
    examples = _examples(ds, vectorizer, config, training=True)
    steps = int(_bucketed(examples, config, config.drop_remainder).reduce(
        0, lambda count, _: count + 1))

    def epoch(e: int) -> tf.data.Dataset:
        seed = config.seed * 100003 + e
        shuffled = examples.shuffle(config.shuffle_buffer, seed=seed,
                                    reshuffle_each_iteration=False)
        batches = _bucketed(shuffled, config, config.drop_remainder, weighted=True)
        if unlabeled is None:
            return batches
        # Shuffled as text and not cached: an epoch reads only part of the unlabelled set,
        # and tf.data discards a cache that was not read to its end.
        texts = unlabeled.shuffle(config.shuffle_buffer, seed=seed,
                                  reshuffle_each_iteration=False)
        texts = _bucketed(_examples(texts, vectorizer, config, training=True, cache=False),
                          config, config.drop_remainder).repeat()
        return tf.data.Dataset.zip(batches, texts).map(
            lambda labelled, other: ({"tokens": labelled[0], "unlabeled": other[0]},
                                     *labelled[1:]))

    epochs = [epoch(e) for e in range(first_epoch, config.epochs)]
    ds = functools.reduce(tf.data.Dataset.concatenate, epochs or [epoch(0).take(0)])
    return shard_by_data(ds.prefetch(tf.data.AUTOTUNE)), steps


def token_counts(ds: tf.data.Dataset, vectorizer: keras.layers.TextVectorization,
                 config: Any) -> np.ndarray:
    """How often each id (`config.vocab_size` of them) is among the texts' first
    `config.max_length` tokens (padding, id 0: never)."""
    ids = ds.batch(1024).map(lambda text, label: vectorizer(text)[:, :config.max_length])
    counts = ids.reduce(tf.zeros([config.vocab_size], tf.int64), lambda total, batch: total
                        + tf.math.bincount(batch.flat_values, minlength=config.vocab_size,
                                           maxlength=config.vocab_size, dtype=tf.int64))
    return counts.numpy()
