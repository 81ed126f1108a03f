"""Corpus → vocabulary → one token stream per split → TBPTT batches.

A corpus is either a TFDS dataset whose examples hold text (`tiny_shakespeare`:
one example per split; `imdb_reviews`: one review per example) or a directory
of plain-text files in Mikolov's PTB format (`ptb.train.txt`, ...: one sentence
per line, tokens separated by spaces). Each split becomes one stream: the
examples' texts in order, a line end between two examples (unless the first
ends with one; a file is one example), each line end a token (`<eos>` at word
level, `"\\n"` at character level). With `config.standardize = "sentiment"`,
words are the sentiment recipe's tokens (its standardization, then
whitespace), so the two recipes share a vocabulary
(`recipes.sentiment.pretrained`). With `config.reverse`, every split is read
backwards, token by token (`reverse`): a backward language model is this same
model trained on the reversed text.
"""

from __future__ import annotations

import collections
import json
import pathlib
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from recipes.common.data import load_tfds
from recipes.common.errors import RecipeError
from recipes.common.text import standardize as sentiment_standardize


def tokenize(text: tf.Tensor, level: str, standardize: str = "") -> tf.RaggedTensor:
    """`[batch]` strings → `[batch, (tokens)]` strings.

    Character level: Unicode characters (line ends included). Word level:
    whitespace-separated words, each line end an `<eos>` token; with
    `standardize="sentiment"`, first the sentiment recipe's standardization
    (lower case, HTML line breaks and punctuation to spaces).
    """
    if level == "char":
        return tf.strings.unicode_split(text, "UTF-8")
    if standardize == "sentiment":
        text = sentiment_standardize(text)  # (keeps "\n": it is not punctuation)
    return tf.strings.split(tf.strings.regex_replace(text, "\n", " <eos> "))


def read_splits(config: Any) -> list[str | None]:
    """The train, validation and test texts, each as one string (`max_chars` at most).

    The test text is None where `config.test_split` is empty (no test split). With
    `config.reverse`, each text is read backwards (`reverse`).
    """
    texts = _read_splits(config)
    if not config.test_split:
        texts.append(None)
    texts = [text[:config.max_chars] if text and config.max_chars else text for text in texts]
    return [reverse(text, config) if text and config.reverse else text for text in texts]


def reverse(text: str, config: Any) -> str:
    """`text` backwards, token by token (`tokenize`'s tokens in reverse order, each line end
    a line end again): characters, or words, whose standardization is then a no-op."""
    if config.level == "char":
        return text[::-1]
    tokens = tokenize(tf.constant([text]), config.level, config.standardize)[0].numpy()
    # (every token a Python string for a moment: memory as for the vocabulary's count)
    return " ".join("\n" if t == b"<eos>" else t.decode("utf-8") for t in tokens[::-1])


def _read_splits(config: Any) -> list[str]:
    splits = [config.train_split, config.validation_split, config.test_split]
    splits = splits if config.test_split else splits[:2]
    if config.dataset:
        datasets = load_tfds(config.dataset, splits, config.data_dir, download=config.download)
        feature = config.text_feature
        try:
            return [join_examples(text.decode("utf-8") for text in ds.map(
                lambda ex: ex[feature]).as_numpy_iterator()) for ds in datasets]
        except KeyError:
            features = list(datasets[0].element_spec)
            raise RecipeError(
                f"--config.text_feature={config.text_feature!r} is not a feature of "
                f"{config.dataset!r} (it has {features})") from None
    text_dir = pathlib.Path(config.text_dir).expanduser()
    texts = []
    for split in splits:
        path = text_dir / config.text_files.format(split=split)
        if not path.is_file():
            raise RecipeError(
                f"no corpus file {path}; set --config.text_dir to the directory holding "
                f"{config.text_files.format(split='{train,valid,test}')}")
        texts.append(path.read_text(encoding="utf-8"))
    return texts


def join_examples(texts: Iterable[str]) -> str:
    """The texts in order, with a line end between two where the first lacks one."""
    parts: list[str] = []
    for text in texts:
        if parts and not parts[-1].endswith("\n"):
            parts.append("\n")
        parts.append(text)
    return "".join(parts)


def build_vocabulary(config: Any, train_text: str, vocab_file: pathlib.Path,
                     given: list[str] | None = None) -> list[str]:
    """The training split's tokens, most frequent first, without the unknown token.

    At most `config.vocab_size - 1` of them (0: all); every other token maps to
    `config.unknown_token` (id 0). Kept in `vocab_file` (JSON), so a resumed run
    and the export use the same ids. `given`: these tokens instead (the vocabulary of
    `config.embedding_from`); `RecipeError` if `vocab_file` already holds others.
    """
    if vocab_file.exists():
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        if given is not None and vocab != given:
            raise RecipeError(f"{vocab_file} is not the vocabulary of --config.embedding_from="
                              f"{config.embedding_from}: use another workdir")
        return vocab
    if given is not None:
        vocab = given
    else:
        tokens = tokenize(tf.constant([train_text]), config.level,
                          config.standardize)[0].numpy()
        counts = collections.Counter(t.decode("utf-8") for t in tokens)
        counts.pop(config.unknown_token, None)
        vocab = sorted(counts, key=lambda t: (-counts[t], t))
        if config.vocab_size:
            vocab = vocab[:config.vocab_size - 1]
    tmp = vocab_file.with_name(f".{vocab_file.name}.tmp")
    tmp.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tmp.replace(vocab_file)
    return vocab


def make_lookup(config: Any, vocab: list[str], invert: bool = False) -> keras.layers.StringLookup:
    """token → id (0 = unknown), or id → token with `invert=True`."""
    return keras.layers.StringLookup(vocabulary=vocab, oov_token=config.unknown_token,
                                     invert=invert, output_mode="int")


def to_stream(text: str, lookup: keras.layers.StringLookup, config: Any) -> np.ndarray:
    """A whole split → its token ids, `int32 [tokens]`."""
    return lookup(tokenize(tf.constant([text]), config.level, config.standardize)[0]
                  ).numpy().astype(np.int32)


def tbptt_batches(stream: np.ndarray, batch_size: int, num_steps: int) -> tf.data.Dataset:
    """Consecutive `(inputs, targets)` windows for truncated back-propagation through time.

    The stream is cut into `batch_size` contiguous rows (the last `< batch_size`
    tokens dropped); batch k holds columns `[k*num_steps, (k+1)*num_steps)` of
    every row, so row r of batch k+1 continues row r of batch k and a stateful
    model carries its state across batches. Targets are the inputs shifted by one.
    """
    row_length = (len(stream) - 1) // batch_size
    if row_length < num_steps:
        raise RecipeError(
            f"a split of {len(stream)} tokens is too short for batch_size={batch_size} x "
            f"num_steps={num_steps}")
    rows = stream[:batch_size * row_length + 1]
    inputs = rows[:-1].reshape(batch_size, row_length)
    targets = rows[1:].reshape(batch_size, row_length)
    num_batches = row_length // num_steps
    windows = lambda a: a[:, :num_batches * num_steps].reshape(  # noqa: E731
        batch_size, num_batches, num_steps).transpose(1, 0, 2)
    return tf.data.Dataset.from_tensor_slices((windows(inputs), windows(targets)))
