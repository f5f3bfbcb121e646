"""Many sessions in one forward (in-batch parallel computing, Delta Tuning; S-LoRA's and
Punica's idea for adapters): steps of different requests that arrive within a short
window and can share a forward are run as one.

A chunk of an Evaluate can share when its forward is its rows behind nothing or behind
the shared states of its tokens ahead, changed by row-local hooks at most
(`Scorer.mergeable`: soft prompts spliced into the rows; LoRA, adapters, bias, deep
prompts and AdaMix, each hooked on its own rows, AdaMix's rows on their routed copies),
or, along the shared-attention path, a prefix's rows behind its own virtual keys and
values. Chunks of the two paths never share a forward. Combinations merge when their
parts do, whatever their hooks' forms. A prefix combined with a weight kind runs in its
own forward: its tokens ahead run per candidate, under its hooks.

Generate's steps merge along paths of their own: its input forward (`StartStep`,
`generation.start_together`: rows left-padded to the widest, every kind but the prefix's
virtual keys and values) and each token step (`DecodeStep`, `generation.decode_together`:
one new token for every row of several generations, each generation's KV cache padded
ahead to the longest, for every kind), each generation's hooks on its own rows.

There is no scheduler thread. A request's step (a chunk, a token step) is put in the
pending list; the request waits the window when other requests are in flight (closed
early once every request in flight has a step waiting), then takes its turn at the model
(`FairTurns`, so tenants are still served round robin). In its turn it runs every
pending step of its path that fits the token bound with its own, in one forward, and
hands each its logits. A step already run by another request's turn returns at once. A
merged forward that runs out of memory is not retried merged: each step runs again
alone, where its own out-of-memory handling applies (a chunk halves itself).
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from backbone_server.fairness import FairTurns
from backbone_server.generation import Generation, decode_together, start_together
from backbone_server.scoring import Chunk, Scorer, out_of_memory

DEFAULT_WINDOW_MS = 2.0
# On the 2-core CPU box a forward of tiny-llama stopped getting cheaper per token at about
# a thousand tokens (scripts/bench_forward_sizes.py); a bigger merged forward there gains
# nothing per token and pays for its padding.
CPU_MERGE_TOKENS = 1024
MAX_WIDTH_GAP = 0.125  # chunks merge when their rows' widths differ by at most this fraction


class Step:
    """One request's forward, waiting to run alone or with other requests' steps of its
    `path`. A subclass says what it costs (`tokens`: rows x tokens, against the bound),
    whom it joins, and how it runs alone and together."""

    path: str
    tokens: int

    def __init__(self):
        self.done = threading.Event()
        self.logits: torch.Tensor | None = None
        self.alone = False  # its merged forward failed: it runs by itself

    def joins(self, other: "Step") -> bool:
        """Whether this step shares a forward with `other`, a pending step of its path."""
        return True

    def run_alone(self) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def run_together(steps: list["Step"]) -> list[torch.Tensor]:
        raise NotImplementedError


class ChunkStep(Step):
    """A chunk of an Evaluate (or Predict): its candidates on one bucket, `Scorer.forward_chunk`."""

    def __init__(self, scorer: Scorer, chunk: Chunk):
        super().__init__()
        self.scorer = scorer
        self.chunk = chunk
        self.path = scorer.merge_path(chunk.bucket)
        self.tokens = len(chunk.group) * scorer.tokens_per_candidate(chunk.bucket)  # as score_chunks sized it

    @property
    def width(self) -> int:
        return self.chunk.bucket.row_ids.shape[1]

    def joins(self, other: "ChunkStep") -> bool:
        # Rows are padded to the widest: a much wider or narrower chunk would cost more in
        # padding than sharing the forward saves.
        return abs(other.width - self.width) <= MAX_WIDTH_GAP * self.width

    def run_alone(self) -> torch.Tensor:
        c = self.chunk
        return self.scorer.forward_chunk(c.session, c.bucket, c.group, c.params, c.prefix, c.routing)

    @staticmethod
    def run_together(steps: list["ChunkStep"]) -> list[torch.Tensor]:
        return steps[0].scorer.forward_merged([s.chunk for s in steps])


class StartStep(Step):
    """A Generation's input forward (`Generation.start`), on the rows path. Rows are
    left-padded to the widest, so the width rule of chunks applies."""

    path = "start"

    def __init__(self, scorer: Scorer, generation: Generation):
        super().__init__()
        self.scorer = scorer  # counts the forwards
        self.generation = generation
        self.width = generation.input_width
        self.tokens = len(generation.examples) * self.width

    def joins(self, other: "StartStep") -> bool:
        return abs(other.width - self.width) <= MAX_WIDTH_GAP * self.width

    def run_alone(self) -> torch.Tensor:
        with self.scorer.running(len(self.generation.examples), self.tokens):
            return self.generation.start()

    @staticmethod
    def run_together(steps: list["StartStep"]) -> list[torch.Tensor]:
        with steps[0].scorer.running(sum(len(s.generation.examples) for s in steps), sum(s.tokens for s in steps)):
            return start_together([s.generation for s in steps])


class DecodeStep(Step):
    """One new token for every row of a Generation (`Generation.decode`). The rows of any
    two generations share a forward: a new token's cost barely depends on how far back
    its cache reaches, so no width rule applies."""

    path = "decode"

    def __init__(self, scorer: Scorer, generation: Generation, chosen: torch.Tensor):
        super().__init__()
        self.scorer = scorer  # counts the forwards
        self.generation = generation
        self.chosen = chosen  # (B,) the tokens this step runs
        # What a merged forward holds of it: one new token per row (its cache is held anyway).
        self.tokens = len(chosen)

    def run_alone(self) -> torch.Tensor:
        with self.scorer.running(len(self.chosen), self.tokens):
            return self.generation.decode(self.chosen)

    @staticmethod
    def run_together(steps: list["DecodeStep"]) -> list[torch.Tensor]:
        with steps[0].scorer.running(sum(len(s.chosen) for s in steps), sum(s.tokens for s in steps)):
            return decode_together([s.generation for s in steps], [s.chosen for s in steps])


class ForwardMerger:
    """`window_s` 0: every step runs in its own forward. `max_tokens`: the most tokens a
    merged forward holds (0: the caller's bound alone); a step with no room left for
    another of its size runs at once, without waiting the window."""

    def __init__(self, scorer: Scorer, turns: FairTurns, window_s: float = DEFAULT_WINDOW_MS / 1e3,
                 max_tokens: int = 0):
        self.scorer = scorer
        self.turns = turns
        self.window_s = window_s
        self.max_tokens = max_tokens
        self.merged_chunks = 0  # steps that shared a forward with another request's
        self.merged_by_path: Counter[str] = Counter()
        self._pending: list[Step] = []
        self._in_flight = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a step was added or done

    @contextmanager
    def request(self) -> Iterator[None]:
        """Marks a request in flight: steps wait the window only when another one is."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def run(self, step: Step, tenant: str, bound: int, cancelled: Callable[[], bool] | None,
            mergeable: bool = True) -> torch.Tensor:
        """The step's logits: in a forward shared with other pending steps where the window
        is open and the step can share, else in a forward of its own, in the tenant's turn."""
        if self.window_s > 0 and mergeable:
            return self.submit(step, tenant, bound, cancelled)
        with self.turns.turn(tenant, cancelled):
            return step.run_alone()

    def submit(self, step: Step, tenant: str, bound: int, cancelled: Callable[[], bool] | None) -> torch.Tensor:
        """The step's logits, computed in a forward shared with other pending steps of its path."""
        if self.max_tokens:
            bound = min(bound, self.max_tokens)
        with self._lock:
            self._pending.append(step)
            if len(self._pending) >= self._in_flight:
                self._arrived.notify_all()  # the last one the others wait for
            elif self._in_flight > 1 and self.window_s > 0 and 2 * step.tokens <= bound:
                # The window closes early once every request in flight has a step waiting:
                # nobody else can come. A step with no room for one of its size waits for nobody.
                self._arrived.wait_for(lambda: step.done.is_set() or len(self._pending) >= self._in_flight,
                                       self.window_s)
        if not step.done.is_set():
            try:
                with self.turns.turn(tenant, cancelled):
                    if not step.done.is_set():
                        self._run(step, bound)
            except BaseException:
                with self._lock:  # left while waiting for its turn: nobody runs it now
                    if step in self._pending:
                        self._pending.remove(step)
                raise
        if step.alone:
            with self.turns.turn(tenant, cancelled):
                return step.run_alone()
        return step.logits

    def _run(self, step: Step, bound: int) -> None:
        """In the caller's turn: its step and every pending step of its path that fits with it."""
        with self._lock:
            batch, tokens = [step], step.tokens
            for other in self._pending:
                if (other is not step and not other.done.is_set() and other.path == step.path
                        and tokens + other.tokens <= bound and step.joins(other)):
                    batch.append(other)
                    tokens += other.tokens
            for member in batch:
                self._pending.remove(member)
        try:
            self._run_batch(batch)
        finally:
            with self._lock:
                self._arrived.notify_all()  # wakes the members waiting out the window

    def _run_batch(self, batch: list[Step]) -> None:
        if len(batch) == 1:
            try:
                batch[0].logits = batch[0].run_alone()
            finally:
                batch[0].done.set()
            return
        try:
            outputs = type(batch[0]).run_together(batch)
        except Exception as error:
            for member in batch:  # each runs alone, where an out-of-memory halves a chunk
                member.alone = True
                member.done.set()
            if not out_of_memory(error):
                raise
            return
        with self._lock:
            self.merged_chunks += len(batch)
            self.merged_by_path[batch[0].path] += len(batch)
        for member, logits in zip(batch, outputs):
            member.logits = logits
            member.done.set()
