"""`RecipeError` (a user mistake: one `error:` line, exit status 2) and config checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RecipeError(Exception):
    """A user mistake (bad flag, missing data, ...): reported as one line."""


def check_config(config: Any, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raises `RecipeError` naming the first field whose value breaks its rule."""
    for field, (ok, must) in rules.items():
        value = config[field]
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise RecipeError(f"--config.{field}={value!r} is invalid: it must be {must}")
