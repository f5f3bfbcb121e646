"""Batching a session's examples for the forward: length buckets, padding, and the keys
and values of the tokens ahead of the prompt (prefix states).

Examples are sorted by length and grouped into buckets (little padding), each at most
the token bound for one candidate, so that a whole population of a bucket fits the
memory bound in as few forwards as possible. A bucket's padded tensors are built once
per evaluated range and kept (`RangeCache`, bounded per session and overall).

Causal models with text before the prompt take the prefix-reuse path: the tokens ahead
of the prompt do not depend on the candidate, so their keys and values are computed
once per bucket and each candidate runs only the prompt and the tokens after it. The
states are kept by content (the bucket's token ids), engine-wide, in a `PrefixStore`
bounded by memory: later calls, and other sessions over the same texts (a `compare`, a
sweep), find them there.

A delta whose prompt is keys and values (`kv_prompt`, the prefix kind) has no prompt
slots in its rows: in a causal model the rows are the tokens after {prompt}, behind the
ahead tokens' states and the candidate's n virtual tokens (`virtual`), at the positions
they would have with n real tokens there; in a masked model the rows are all the
example's tokens, behind the n virtual tokens.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch

from backbone_server.encoding import EncodedExample
from backbone_server.models import Backbone
from backbone_server.sessions import SessionState

DEFAULT_RANGE_CACHE_BYTES = 256 * 2**20  # the padded buckets of evaluated ranges, all sessions together
DEFAULT_SESSION_CACHE_BYTES = 64 * 2**20  # the same, one session's

PrefixStates = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (B, kv_heads, Lp, head_dim)


@dataclass(frozen=True)
class Bucket:
    """Examples (indices into the evaluated range) scored together.

    A candidate's forward holds, per example: the tokens ahead (`prefix_ids`, when there
    are any: their states are shared by every candidate when `reuse`, else computed per
    candidate first), then `virtual` keys and values of the candidate's prefix, then the
    row (`row_ids`), whose first token sits at position `row_start` (None: the model's
    own positions)."""

    indices: list[int]
    index: torch.Tensor  # the same, on the device
    reuse: bool
    prefix_ids: torch.Tensor | None  # (B, Lp)
    prefix_mask: torch.Tensor | None  # (B, Lp)
    row_ids: torch.Tensor  # (B, Ls): token ids, prompt slot i as -(i + 1), padding as pad id
    row_mask: torch.Tensor  # (B, Ls)
    read: torch.Tensor  # (B,) position in the row whose output is scored
    row_start: torch.Tensor | None  # (B,)
    virtual: int = 0
    prefix_key: bytes | None = None  # the content of prefix_ids and prefix_mask, for the PrefixStore

    @property
    def tokens_per_candidate(self) -> int:
        prefix = self.prefix_ids.shape[1] if self.prefix_ids is not None else 0
        return len(self.indices) * (prefix + self.virtual + self.row_ids.shape[1])


class PrefixStore:
    """Prefix states by the content of the tokens they are of, least recently used first
    out when over `limit` bytes (a state larger than the limit is not kept)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[bytes, tuple[PrefixStates, int]] = OrderedDict()

    def get(self, key: bytes) -> PrefixStates | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, states: PrefixStates) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in states)
        if size > self.limit:
            return
        while self.bytes + size > self.limit:
            _, (_, freed) = self._entries.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1
        self._entries[key] = (states, size)
        self.bytes += size

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def report(self) -> str:
        return (f"prefix states: {len(self._entries)} kept, {self.bytes / 2**20:.1f} of {self.limit / 2**20:.0f} MiB; "
                f"{self.hits} hits, {self.misses} misses")


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class RangeCache:
    """The buckets of each evaluated range, by (session, range), so that a generation
    starts its forwards without host work or host-to-device copies. Least recently used
    ranges go first past `limit` bytes overall or `session_limit` bytes for one session;
    an evicted range is rebuilt when asked for again."""

    def __init__(self, limit: int = DEFAULT_RANGE_CACHE_BYTES, session_limit: int = DEFAULT_SESSION_CACHE_BYTES):
        self.limit = limit
        self.session_limit = min(session_limit, limit)
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[tuple, tuple[list[Bucket], int]] = OrderedDict()
        self._per_session: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str, key: tuple) -> list[Bucket] | None:
        with self._lock:
            entry = self._entries.get((session_id, key))
            if entry is None:
                return None
            self._entries.move_to_end((session_id, key))
            return entry[0]

    def put(self, session_id: str, key: tuple, buckets: list[Bucket]) -> None:
        size = sum(_tensor_bytes(vars(bucket).values()) for bucket in buckets)
        if size > self.session_limit:
            return
        with self._lock:
            if (session_id, key) in self._entries:
                return
            while self._per_session.get(session_id, 0) + size > self.session_limit:
                self._evict(next(k for k in self._entries if k[0] == session_id))
            while self.bytes + size > self.limit:
                self._evict(next(iter(self._entries)))
            self._entries[session_id, key] = (buckets, size)
            self.bytes += size
            self._per_session[session_id] = self._per_session.get(session_id, 0) + size

    def _evict(self, entry_key: tuple) -> None:
        self._forget(entry_key)
        self.evictions += 1

    def _forget(self, entry_key: tuple) -> None:
        _, size = self._entries.pop(entry_key)
        self.bytes -= size
        left = self._per_session[entry_key[0]] - size
        if left:
            self._per_session[entry_key[0]] = left
        else:
            del self._per_session[entry_key[0]]

    def drop_session(self, session_id: str) -> None:
        """Frees a closed or expired session's ranges (not counted as evictions)."""
        with self._lock:
            for entry_key in [k for k in self._entries if k[0] == session_id]:
                self._forget(entry_key)

    def session_bytes(self, session_id: str) -> int:
        with self._lock:
            return self._per_session.get(session_id, 0)


class Batcher:
    def __init__(self, backbone: Backbone, prefix_cache_bytes: int, ranges: RangeCache | None = None):
        self.backbone = backbone
        self.store = PrefixStore(prefix_cache_bytes)
        self.ranges = ranges or RangeCache()
        pad = backbone.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (backbone.tokenizer.eos_token_id or 0)

    def buckets(self, session: SessionState, split: str, start: int, selected: list[EncodedExample],
                tokens: int) -> Iterator[tuple[Bucket, PrefixStates | None]]:
        """Each bucket of the selected examples (its `index`: their positions in
        `selected`) with its prefix states (None without prefix reuse)."""
        key = (split, start, start + len(selected), tokens)
        buckets = self.ranges.get(session.id, key)
        if buckets is None:
            buckets = self._buckets(session, selected, tokens)
            self.ranges.put(session.id, key, buckets)
        for bucket in buckets:
            yield bucket, self._prefix_states(session, bucket) if bucket.reuse else None

    def _buckets(self, session: SessionState, examples: list[EncodedExample], tokens: int) -> list[Bucket]:
        """Length-sorted groups of examples, each at most `tokens` for one candidate."""
        n = session.delta.prompt_length
        # Examples with and without tokens ahead of the prompt never share a bucket: a
        # mixed one would hold fully masked rows of tokens ahead.
        order = sorted(range(len(examples)), key=lambda i: (bool(examples[i].before), examples[i].length(n)))
        groups: list[list[int]] = []
        for i in order:
            same_kind = groups and bool(examples[groups[-1][0]].before) == bool(examples[i].before)
            if same_kind and (len(groups[-1]) + 1) * examples[i].length(n) <= tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return [self._make_bucket(session, [examples[i] for i in group], group) for group in groups]

    def _make_bucket(self, session: SessionState, examples: list[EncodedExample], indices: list[int]) -> Bucket:
        n = session.delta.prompt_length
        causal = self.backbone.architecture == "causal"
        has_ahead = all(e.before for e in examples)
        virtual = n if session.delta.kv_prompt else 0
        if virtual:
            slots = []  # the prompt is keys and values behind the rows, not tokens of them
            ahead = causal and has_ahead
            reuse = ahead and session.prefix_reuse
        else:
            slots = list(range(-1, -n - 1, -1))
            ahead = reuse = session.prefix_reuse and has_ahead
        prefix_key = None
        if ahead:
            befores = [list(e.before) for e in examples]
            prefix_ids, prefix_mask = self._pad(befores)
            prefix_key = hashlib.blake2b(repr(befores).encode(), digest_size=16).digest()
            rows = [slots + list(e.after) for e in examples]
            read = [e.read - len(e.before) - virtual for e in examples]
            row_start = [len(e.before) + virtual for e in examples]
        elif virtual and causal:  # nothing ahead of the prompt: the rows start after it
            prefix_ids = prefix_mask = None
            rows = [list(e.after) for e in examples]
            read = [e.read - virtual for e in examples]
            row_start = [virtual] * len(examples)
        else:
            prefix_ids = prefix_mask = None
            rows = [list(e.before) + slots + list(e.after) for e in examples]
            read = [e.read - (virtual if e.read >= len(e.before) + virtual else 0) for e in examples]
            row_start = None
        row_ids, row_mask = self._pad(rows)
        device = self.backbone.device
        return Bucket(
            indices=indices,
            index=torch.tensor(indices, device=device),
            reuse=reuse,
            prefix_ids=prefix_ids,
            prefix_mask=prefix_mask,
            row_ids=row_ids,
            row_mask=row_mask,
            read=torch.tensor(read, device=device),
            row_start=None if row_start is None else torch.tensor(row_start, device=device),
            virtual=virtual,
            prefix_key=prefix_key,
        )

    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask: positions stay 0..len-1 for every row."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, :len(sequence)] = 1
        return ids.to(self.backbone.device), mask.to(self.backbone.device)

    def _prefix_states(self, session: SessionState, bucket: Bucket) -> PrefixStates:
        """Keys and values of the candidate-independent tokens, per layer."""
        session.prefix_keys.add(bucket.prefix_key)
        states = self.store.get(bucket.prefix_key)
        if states is None:
            # Constants even on the gradient path: nothing before the prompt depends on z.
            # Made outside inference mode, so that a Gradient call may reuse what an
            # Evaluate stored (autograd refuses to save inference tensors for backward).
            with torch.inference_mode(False), torch.no_grad():
                output = self.backbone.body(input_ids=bucket.prefix_ids, attention_mask=bucket.prefix_mask,
                                            use_cache=True)
            states = [(layer.keys, layer.values) for layer in output.cache.layers]
            self.store.put(bucket.prefix_key, states)
        return states
