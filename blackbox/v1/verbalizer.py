"""A verbalizer entry on the wire: one class's label words, one word or several joined
by "|" ("great|good"), as CreateSessionRequest.verbalizer carries them."""

from __future__ import annotations

from typing import Sequence

WORD_SEPARATOR = "|"


def label_words(entry: str) -> list[str]:
    """The words of one class's entry, in order (the first is the class's answer)."""
    return entry.split(WORD_SEPARATOR)


def join_label_words(words: Sequence[str]) -> str:
    return WORD_SEPARATOR.join(words)
