"""Many sessions in one forward (in-batch parallel computing, Delta Tuning; S-LoRA's and
Punica's idea for adapters): chunks of different requests that arrive within a short
window and can share a forward are run as one.

A chunk can share when its forward is its rows behind nothing or behind the shared states
of its tokens ahead, changed by row-local hooks at most (`Scorer.mergeable`: soft prompts
spliced into the rows; LoRA, adapters, bias and deep prompts, each hooked on its own
rows), or, along the shared-attention path, a prefix's rows behind its own virtual keys
and values. Chunks of the two paths never share a forward. Combinations merge when their
parts do. Any other chunk (AdaMix, a deep prompt combined with a weight kind) runs in its
own forward, as before.

There is no scheduler thread. A request's chunk is put in the pending list; the request
waits the window when other requests are in flight, then takes its turn at the model
(`FairTurns`, so tenants are still served round robin). In its turn it runs every
pending chunk that fits the token bound with its own, in one forward, and hands each
its logits. A chunk already run by another request's turn returns at once. A merged
forward that runs out of memory is not retried merged: each chunk runs again alone,
where its own out-of-memory halving applies.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from backbone_server.batching import Bucket, PrefixStates
from backbone_server.fairness import FairTurns
from backbone_server.scoring import Scorer, out_of_memory
from backbone_server.sessions import SessionState

DEFAULT_WINDOW_MS = 2.0
MAX_WIDTH_GAP = 0.125  # chunks merge when their rows' widths differ by at most this fraction


@dataclass(eq=False)
class Chunk:
    session: SessionState
    bucket: Bucket
    group: torch.Tensor  # (p, n, h) prompts
    params: torch.Tensor | None  # (p, D) module parameters of a row-local kind
    prefix: PrefixStates | None  # the shared states of its tokens ahead, if any
    tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None
    alone: bool = False  # its merged forward failed: it runs by itself


def _width(chunk: "Chunk") -> int:
    return chunk.bucket.row_ids.shape[1]


class ForwardMerger:
    """`window_s` 0: every chunk runs in its own forward."""

    def __init__(self, scorer: Scorer, turns: FairTurns, window_s: float = DEFAULT_WINDOW_MS / 1e3):
        self.scorer = scorer
        self.turns = turns
        self.window_s = window_s
        self.merged_chunks = 0  # chunks that shared a forward with another request's
        self._pending: list[Chunk] = []
        self._in_flight = 0
        self._lock = threading.Lock()

    @contextmanager
    def request(self) -> Iterator[None]:
        """Marks a request in flight: chunks wait the window only when another one is."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def forward(self, session: SessionState, bucket: Bucket, group: torch.Tensor, params: torch.Tensor | None,
                prefix: PrefixStates | None, tenant: str, bound: int,
                cancelled: Callable[[], bool] | None) -> torch.Tensor:
        """The chunk's (p, B, C) logits, computed in a forward shared with other pending chunks."""
        chunk = Chunk(session, bucket, group, params, prefix, len(group) * bucket.tokens_per_candidate)
        with self._lock:
            self._pending.append(chunk)
            others = self._in_flight > 1
        if others and self.window_s > 0:
            chunk.done.wait(self.window_s)
        if not chunk.done.is_set():
            with self.turns.turn(tenant, cancelled):
                if not chunk.done.is_set():
                    self._run(chunk, bound)
        if chunk.alone:
            with self.turns.turn(tenant, cancelled):
                return self._forward_alone(chunk)
        return chunk.logits

    def _run(self, chunk: Chunk, bound: int) -> None:
        """In the caller's turn: its chunk and every pending chunk that fits with it."""
        with self._lock:
            batch, tokens = [chunk], chunk.tokens
            path = self.scorer.merge_path(chunk.bucket)
            width = _width(chunk)
            for other in self._pending:
                # Rows are padded to the widest: a much wider or narrower chunk would cost
                # more in padding than sharing the forward saves.
                if (other is not chunk and not other.done.is_set() and tokens + other.tokens <= bound
                        and self.scorer.merge_path(other.bucket) == path
                        and abs(_width(other) - width) <= MAX_WIDTH_GAP * width):
                    batch.append(other)
                    tokens += other.tokens
            for member in batch:
                self._pending.remove(member)
        if len(batch) == 1:
            chunk.logits = self._forward_alone(chunk)
            chunk.done.set()
            return
        try:
            began = time.perf_counter()
            outputs = self.scorer.forward_merged([(c.session, c.bucket, c.group, c.params, c.prefix) for c in batch])
            if self.scorer.on_forward is not None:
                self.scorer.on_forward(tokens, bound, time.perf_counter() - began)
        except Exception as error:
            if not out_of_memory(error):
                for member in batch:
                    member.alone = True
                    member.done.set()
                raise
            for member in batch:  # each runs alone, and halves itself if it must
                member.alone = True
                member.done.set()
            return
        with self._lock:
            self.merged_chunks += len(batch)
        for member, logits in zip(batch, outputs):
            member.logits = logits
            member.done.set()

    def _forward_alone(self, chunk: Chunk) -> torch.Tensor:
        return self.scorer.forward_chunk(chunk.session, chunk.bucket, chunk.group, chunk.params, chunk.prefix)
