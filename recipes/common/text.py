"""The text standardization the sentiment and language model recipes share.

The sentiment recipe's words are standardized text split on whitespace; the
language model's, with `config.standardize = "sentiment"`, are the same words,
so that a sentiment model can start from a language model
(`--config.init_from`). `standardize` runs in the graph (input pipelines,
exports); `standardize_str` is the same on a Python string, for the deployed
models, which take token ids (TFLite's built-in ops and ONNX have no string ops).
"""

from __future__ import annotations

import re

import keras
import tensorflow as tf

# ASCII punctuation, and the full-width and CJK punctuation of Chinese text (，。！？、：；“”
# ‘’…—「」《》（）...: the CJK symbols block and the full-width forms of ASCII punctuation).
PUNCTUATION = (r"[[:punct:]]|[\x{2014}\x{2018}\x{2019}\x{201C}\x{201D}\x{2026}"
               r"\x{3000}-\x{303F}\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF20}\x{FF3B}-\x{FF40}"
               r"\x{FF5B}-\x{FF65}]")


# (Registered under the sentiment recipe's package, the name its saved vectorizers know.)
@keras.saving.register_keras_serializable(package="recipes.sentiment")
def standardize(text: tf.Tensor) -> tf.Tensor:
    """Lower case (ASCII), HTML line breaks and punctuation (ASCII, full-width) to spaces."""
    text = tf.strings.lower(text)
    text = tf.strings.regex_replace(text, r"<br\s*/?>", " ")
    return tf.strings.regex_replace(text, PUNCTUATION, " ")


_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_BREAK = re.compile(r"<br[\t\n\f\r ]*/?>")  # RE2's \s: [\t\n\f\r ]
_PUNCTUATION = re.compile(  # POSIX [[:punct:]] in ASCII, and PUNCTUATION's rest
    "[!-/:-@\\[-`{-~\u2014\u2018\u2019\u201c\u201d\u2026\u3000-\u303f\uff01-\uff0f"
    "\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")


def standardize_str(text: str) -> str:
    """`standardize` of one Python string (lower case: ASCII letters only, as
    `tf.strings.lower`)."""
    text = _BREAK.sub(" ", text.translate(_LOWER))
    return _PUNCTUATION.sub(" ", text)
