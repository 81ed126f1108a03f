"""IMDB (or any TFDS text-classification dataset) → batches of token ids."""

from __future__ import annotations

import pathlib
from typing import Any

import keras
import tensorflow as tf

from lstm_tf.recipe import RecipeError, load_tfds, shard_by_data


def load_splits(config: Any) -> tuple[tf.data.Dataset, tf.data.Dataset, tf.data.Dataset]:
    """The train, validation and test splits as `(text, label)` pairs."""
    splits = load_tfds(config.dataset,
                       [config.train_split, config.validation_split, config.test_split],
                       config.data_dir, download=config.download)
    pick = lambda ex: (ex[config.text_feature], ex[config.label_feature])  # noqa: E731
    try:
        return tuple(ds.map(pick) for ds in splits)
    except KeyError:
        features = list(splits[0].element_spec)
        raise RecipeError(
            f"--config.text_feature={config.text_feature!r} / --config.label_feature="
            f"{config.label_feature!r} are not features of {config.dataset!r} (it has {features})"
        ) from None


@keras.saving.register_keras_serializable(package="recipes.sentiment")
def standardize(text: tf.Tensor) -> tf.Tensor:
    """Lower case, HTML line breaks and ASCII punctuation to spaces."""
    text = tf.strings.lower(text)
    text = tf.strings.regex_replace(text, r"<br\s*/?>", " ")
    return tf.strings.regex_replace(text, r"[[:punct:]]", " ")


def make_vectorizer(config: Any, train: tf.data.Dataset,
                    vocab_file: pathlib.Path) -> keras.layers.TextVectorization:
    """A `TextVectorization` with the training split's vocabulary.

    The vocabulary is kept in `vocab_file`, so a resumed run reuses it.
    """
    vectorizer = keras.layers.TextVectorization(
        max_tokens=config.vocab_size, standardize=standardize, ragged=True)
    if vocab_file.exists():
        vectorizer.set_vocabulary(vocab_file.read_text(encoding="utf-8").split("\n"))
    else:
        vectorizer.adapt(train.map(lambda text, label: text).batch(1024))
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


def batches(ds: tf.data.Dataset, vectorizer: keras.layers.TextVectorization, config: Any,
            training: bool) -> tf.data.Dataset:
    """Bucketed, right-padded `(ids, label)` batches.

    Training drops texts with no tokens and reshuffles every epoch (seeded);
    with `config.drop_remainder`, it keeps only full batches.
    """
    ds = ds.map(
        lambda text, label: (vectorizer(text[None])[0, : config.max_length], label),
        num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        ds = ds.filter(lambda ids, label: tf.size(ids) > 0)
    ds = ds.cache()
    if training:
        ds = ds.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    boundaries = list(range(config.bucket_width, config.max_length + 1, config.bucket_width))
    ds = ds.bucket_by_sequence_length(
        lambda ids, label: tf.size(ids),
        bucket_boundaries=boundaries,
        bucket_batch_sizes=[config.batch_size] * (len(boundaries) + 1),
        pad_to_bucket_boundary=False,
        drop_remainder=training and config.drop_remainder)
    ds = ds.map(lambda ids, label: (_at_least_one_step(ids), label))
    return shard_by_data(ds.prefetch(tf.data.AUTOTUNE))
