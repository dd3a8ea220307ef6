"""What counts as a scoreable text, in one place for the model, training and batch scoring."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any


def invalid_text_reason(text: Any) -> str | None:
    """None for a text the model can score, else a short reason ("null", "not a string: int", "empty")."""
    if text is None or (isinstance(text, float) and text != text) or type(text).__name__ == "NAType":
        return "null text"  # None, and the NaN / pd.NA that pandas and Arrow conversions put for nulls
    if not isinstance(text, str):
        return f"not a string: {type(text).__name__}"
    if not text.strip():
        return "empty or whitespace-only text"
    # all() stops at the first visible character
    if all(c.isspace() or unicodedata.category(c).startswith("C") for c in text):
        return "only control or zero-width characters"  # \u200b, \ufeff, \x00 ...: tokenisers see nothing
    return None


def invalid_text_reasons(texts: Sequence[Any]) -> list[str | None]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    return [invalid_text_reason(text) for text in texts]


def describe_invalid(reasons: Sequence[str | None], limit: int = 5) -> str:
    bad = [(i, r) for i, r in enumerate(reasons) if r is not None]
    shown = ", ".join(f"row {i}: {r}" for i, r in bad[:limit])
    more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
    return f"{len(bad)} invalid text(s): {shown}{more}"
