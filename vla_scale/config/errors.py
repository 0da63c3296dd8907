"""The one error type for configs that cannot run, and the close-match hint every message uses.

Kept apart from the schema and the loader so both (and the train code) raise the same type
without importing each other.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config that cannot run; the message says which key and what to change."""


def suggest(word: str, options: Iterable[str]) -> str:
    """A sentence to append to an error: the closest valid options to `word`, or all of them when none is close."""
    options = [str(o) for o in options]
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    if close:
        return f" Did you mean {' or '.join(repr(c) for c in close)}?"
    return f" Valid keys: {', '.join(sorted(options))}."


def check_at_least(obj: object, prefix: str, keys: tuple[str, ...], low: float) -> None:
    """Each of `keys` on `obj` must be >= `low`; the error names `<prefix>.<key>`."""
    for key in keys:
        value = getattr(obj, key)
        if value < low:
            raise ConfigError(f"{prefix}.{key} must be >= {low}, got {value}")
