"""The recipe's tokenization in plain Python, for the deployed (token-id) models.

The same as the export's in-graph `TextVectorization` (`input_pipeline`), so a
text gets the same ids on a device as in the SavedModel (tested on IMDB):

1. lower case (ASCII letters only, as `tf.strings.lower`);
2. HTML line breaks (`<br>`, `<br />`) and punctuation to spaces (1 and 2:
   `recipes.common.text.standardize_str`);
3. tokens: runs of non-space characters (spaces: ASCII ` \\t\\n\\v\\f\\r`);
4. ids: 0 is padding, 1 an unknown token, and line k (from 0) of `vocab.txt`
   is id k + 2; the first `max_length` ids are kept.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

from recipes.common.text import standardize_str

_SPACES = re.compile(r"[ \t\n\v\f\r]+")
_CHARACTER_SPACES = " \t\n\f\r"  # RE2's \s, which the character split drops

PADDING, UNKNOWN = 0, 1


class Tokenizer:
    """Text → token ids, as the export's in-graph tokenization."""

    def __init__(self, vocab: list[str], max_length: int, split: str = "whitespace",
                 ngrams: int = 1) -> None:
        self.ids_of = {token: k + 2 for k, token in enumerate(vocab)}
        self.max_length, self.split, self.ngrams = max_length, split, ngrams

    @classmethod
    def from_run(cls, workdir: pathlib.Path, config: Any) -> Tokenizer:
        """The tokenizer of a training run (its `vocab.txt` and config)."""
        vocab = (workdir / "vocab.txt").read_text(encoding="utf-8").split("\n")
        return cls(vocab, config.max_length, config.split, config.ngrams)

    @classmethod
    def from_dir(cls, directory: pathlib.Path) -> Tokenizer:
        """The tokenizer of a deploy directory (`vocab.txt`, `tokenizer.json`)."""
        settings = json.loads((directory / "tokenizer.json").read_text())
        vocab = (directory / "vocab.txt").read_text(encoding="utf-8").split("\n")
        return cls(vocab, settings["max_length"], settings.get("split", "whitespace"),
                   settings.get("ngrams", 1))

    def tokens(self, text: str) -> list[str]:
        """The tokens the ids are of (all of them: `ids` keeps the first `max_length`)."""
        text = standardize_str(text)
        if self.split == "character":
            tokens = [c for c in text if c not in _CHARACTER_SPACES]
        else:
            tokens = [t for t in _SPACES.split(text) if t]
        return [" ".join(tokens[i:i + n]) for n in range(1, self.ngrams + 1)
                for i in range(len(tokens) - n + 1)]

    def ids(self, text: str) -> list[int]:
        """The ids of `text`'s first `max_length` tokens (no padding)."""
        return [self.ids_of.get(t, UNKNOWN) for t in self.tokens(text)[:self.max_length]]
