"""Batching a session's examples for the forward: length buckets, padding, and the keys
and values of the tokens ahead of the prompt (prefix states).

Examples are sorted by length and grouped into buckets (little padding), each at most
the token bound for one candidate, so that a whole population of a bucket fits the
memory bound in as few forwards as possible. A bucket's padded tensors are built once
per evaluated range and kept in the session.

Causal models with text before the prompt take the prefix-reuse path: the tokens ahead
of the prompt do not depend on the candidate, so their keys and values are computed
once per bucket (and kept for later calls while they fit the session's cache budget),
and each candidate runs only the prompt and the tokens after it.

A delta whose prompt is keys and values (`kv_prompt`, the prefix kind) has no prompt
slots in its rows: in a causal model the rows are the tokens after {prompt}, behind the
ahead tokens' states and the candidate's n virtual tokens (`virtual`), at the positions
they would have with n real tokens there; in a masked model the rows are all the
example's tokens, behind the n virtual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from backbone_server.encoding import EncodedExample
from backbone_server.models import Backbone
from backbone_server.sessions import SessionState

MAX_CACHED_RANGES = 64  # per session: (split, example range, token bound) bucketings kept

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

    @property
    def tokens_per_candidate(self) -> int:
        prefix = self.prefix_ids.shape[1] if self.prefix_ids is not None else 0
        return len(self.indices) * (prefix + self.virtual + self.row_ids.shape[1])


class Batcher:
    def __init__(self, backbone: Backbone, prefix_cache_bytes: int):
        self.backbone = backbone
        self.prefix_cache_limit = prefix_cache_bytes
        pad = backbone.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (backbone.tokenizer.eos_token_id or 0)

    def buckets(self, session: SessionState, split: str, start: int, selected: list[EncodedExample],
                tokens: int) -> Iterator[tuple[Bucket, PrefixStates | None]]:
        """Each bucket of the selected examples (its `index`: their positions in
        `selected`) with its prefix states (None without prefix reuse)."""
        key = (split, start, start + len(selected), tokens)
        buckets = session.bucket_cache.get(key)
        if buckets is None:
            buckets = self._buckets(session, selected, tokens)
            if len(session.bucket_cache) < MAX_CACHED_RANGES:
                session.bucket_cache[key] = buckets
        for bucket in buckets:
            cache_key = (split, start, start + len(selected), bucket.indices[0], len(bucket.indices))
            yield bucket, self._prefix_states(session, bucket, cache_key) if bucket.reuse else None

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
        if ahead:
            prefix_ids, prefix_mask = self._pad([list(e.before) for e in examples])
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

    def _prefix_states(self, session: SessionState, bucket: Bucket, key: tuple) -> PrefixStates:
        """Keys and values of the candidate-independent tokens, per layer."""
        cached = session.prefix_cache.get(key)
        if cached is not None:
            return cached
        # Constants even on the gradient path: nothing before the prompt depends on z.
        with torch.no_grad():
            output = self.backbone.body(input_ids=bucket.prefix_ids, attention_mask=bucket.prefix_mask,
                                        use_cache=True)
        states = [(layer.keys, layer.values) for layer in output.cache.layers]
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in states)
        if session.prefix_cache_bytes + size <= self.prefix_cache_limit:
            session.prefix_cache[key] = states
            session.prefix_cache_bytes += size
        return states
