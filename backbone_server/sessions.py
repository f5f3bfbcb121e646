"""Sessions: one client's task on the server (its encoded splits, its delta and what is
cached for it), and the registry that holds them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from backbone_server.deltas import Delta
from backbone_server.encoding import EncodedExample, TemplateEncoder
from backbone_server.errors import InvalidArgument, NotFound, ResourceExhausted


@dataclass
class SessionState:
    id: str
    encoder: TemplateEncoder
    delta: Delta
    verbalizer_ids: torch.Tensor  # (W,) the first token of each label word
    splits: dict[str, list[EncodedExample]]
    prefix_reuse: bool
    truncated_examples: int
    # (W,) the class of each label word, when some class has several; None: one word each.
    word_classes: torch.Tensor | None = None
    # The content keys of the prefix states this session's buckets use (kept, shared with
    # other sessions of the same texts, by the engine's PrefixStore in batching.py).
    prefix_keys: set[bytes] = field(default_factory=set)
    # Padded device tensors of each evaluated range, built once: a generation then starts
    # its forwards without host work or host-to-device copies.
    bucket_cache: dict[tuple, list] = field(default_factory=dict)
    # The prompts and parameters of the rows of the last population scored, by z's bytes:
    # the generation's best, checked on dev next, needs no projection again.
    recent_rows: dict[bytes, tuple] = field(default_factory=dict)
    # Scores of single candidates already evaluated, by (split, start, count, z's bytes):
    # a z scored again on the same examples (the final test of a run that never left z = 0,
    # a dev check repeated) costs nothing.
    scored: OrderedDict = field(default_factory=OrderedDict)

    @property
    def num_classes(self) -> int:
        return len(self.verbalizer_ids) if self.word_classes is None else int(self.word_classes.max()) + 1

    def select(self, split: str, start: int, count: int) -> list[EncodedExample]:
        """The examples [start, start + count) of the split (count 0: to its end)."""
        if split not in self.splits:
            raise NotFound(f"session has no split {split!r}; it has {', '.join(self.splits)}")
        examples = self.splits[split]
        if start < 0 or count < 0 or start >= len(examples):
            raise InvalidArgument(
                f"example range start={start} count={count} is outside split {split!r} of {len(examples)}"
            )
        stop = len(examples) if count == 0 else min(len(examples), start + count)
        return examples[start:stop]


def encode_splits(encoder: TemplateEncoder, splits: dict[str, list[tuple[str, str, int]]], classes: int,
                  truncate: bool) -> dict[str, list[EncodedExample]]:
    """Every split's (text_a, text_b, label) examples as token ids around the prompt."""
    if not splits:
        raise InvalidArgument("a session needs at least one split")
    encoded: dict[str, list[EncodedExample]] = {}
    for name, examples in splits.items():
        if not name:
            raise InvalidArgument("every split needs a name")
        if not examples:
            raise InvalidArgument(f"split {name!r} is empty")
        encoded[name] = []
        for index, (text_a, text_b, label) in enumerate(examples):
            if not 0 <= label < classes:
                raise InvalidArgument(f"split {name!r}, example {index}: label {label} is not in 0..{classes - 1}")
            try:
                encoded[name].append(encoder.encode(text_a, text_b, label, truncate, index))
            except InvalidArgument as error:
                raise InvalidArgument(f"split {name!r}, {error}") from None
    return encoded


class SessionRegistry:
    """The sessions of one engine, by id, at most `max_sessions` at a time."""

    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self._sessions: dict[str, SessionState] = {}
        self._lock = threading.Lock()

    def check_capacity(self) -> None:
        with self._lock:
            self._check_capacity()

    def _check_capacity(self) -> None:
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(f"the server holds {self.max_sessions} sessions already; close one first")

    def add(self, session: SessionState) -> None:
        with self._lock:
            self._check_capacity()
            self._sessions[session.id] = session

    def get(self, session_id: str) -> SessionState:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r} (closed, or created on another server)")
        return session

    def close(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise NotFound(f"no session {session_id!r}")

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
