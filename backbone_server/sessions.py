"""Sessions: one client's task on the server (its encoded splits, its delta and what is
cached for it), and the registry that holds them."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from backbone_server.deltas import Delta
from backbone_server.encoding import EncodedExample, TemplateEncoder
from backbone_server.errors import InvalidArgument, NotFound, ResourceExhausted, shown
from backbone_server.tenants import OPEN_TENANT_NAME, Tenant


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
    # The tenant it belongs to, when it was last used (time.monotonic), and the calls
    # running on it now (which keep it from expiring).
    tenant: str = OPEN_TENANT_NAME
    last_used: float = 0.0
    in_use: int = 0
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
            raise NotFound(f"session has no split {shown(split)}; it has {', '.join(self.splits)}")
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
    """The sessions of one engine, by id: at most `max_sessions` at a time, each tenant
    within its own limit, and each dropped once idle for `ttl_s` seconds (0: never).

    A session is its tenant's alone: another tenant's id answers exactly as an id that
    does not exist. A session in use (`held`) never expires under its caller.
    """

    def __init__(self, max_sessions: int, ttl_s: float = 0, on_drop: Callable[[SessionState], None] | None = None):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.expired = 0  # sessions dropped by the idle time-out
        self._on_drop = on_drop
        self._sessions: dict[str, SessionState] = {}
        self._lock = threading.Lock()

    def check_capacity(self, tenant: Tenant) -> None:
        self.expire()
        with self._lock:
            self._check_capacity(tenant)

    def _check_capacity(self, tenant: Tenant) -> None:
        expiry = f" (idle sessions expire after {self.ttl_s:g} s)" if self.ttl_s else ""
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(f"the server holds {self.max_sessions} sessions already; close one first{expiry}")
        held = self._held_by(tenant.name)
        if tenant.max_sessions and held >= tenant.max_sessions:
            raise ResourceExhausted(f"tenant {tenant.name!r} holds {held} sessions, its limit (max_sessions); "
                                    f"close one first{expiry}")

    def _held_by(self, tenant: str) -> int:
        return sum(session.tenant == tenant for session in self._sessions.values())

    def add(self, session: SessionState, tenant: Tenant) -> None:
        with self._lock:
            self._check_capacity(tenant)
            session.tenant = tenant.name
            session.last_used = time.monotonic()
            self._sessions[session.id] = session

    def get(self, session_id: str, tenant: Tenant) -> SessionState:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.tenant != tenant.name:
                raise NotFound(f"no session {shown(session_id)} (closed, expired, or created on another server)")
            session.last_used = time.monotonic()
            return session

    @contextmanager
    def held(self, session_id: str, tenant: Tenant) -> Iterator[SessionState]:
        """The session, kept from expiring while the caller uses it."""
        session = self.get(session_id, tenant)
        with self._lock:
            session.in_use += 1
        try:
            yield session
        finally:
            with self._lock:
                session.in_use -= 1
                session.last_used = time.monotonic()

    def close(self, session_id: str, tenant: Tenant) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.tenant != tenant.name:
                raise NotFound(f"no session {shown(session_id)}")
            del self._sessions[session_id]
        self._dropped(session)

    def expire(self) -> int:
        """Drops the sessions idle for longer than the time-out; returns how many."""
        if not self.ttl_s:
            return 0
        now = time.monotonic()
        with self._lock:
            idle = [s for s in self._sessions.values() if not s.in_use and now - s.last_used > self.ttl_s]
            for session in idle:
                del self._sessions[session.id]
            self.expired += len(idle)
        for session in idle:
            self._dropped(session)
        return len(idle)

    def _dropped(self, session: SessionState) -> None:
        if self._on_drop is not None:
            self._on_drop(session)

    def held_by(self, tenant: str) -> int:
        with self._lock:
            return self._held_by(tenant)

    def by_tenant(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for session in self._sessions.values():
                counts[session.tenant] = counts.get(session.tenant, 0) + 1
            return counts

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
