"""Scoring a population of deltas on a task split: pure torch, no gRPC.

The hot path is `Engine.evaluate`: every candidate of the population is scored on every
example of the split in as few forwards as the memory bound allows. The examples come in
length buckets with their prefix states (`batching.py`); within a bucket all candidates
run in one batched forward (`scoring.py`), split into candidate chunks only when the
bucket times the population would exceed `max_batch_tokens` (from the memory model in
`memory.py` unless the operator sets it; a forward that runs out of memory anyway is
retried in halves).

Deltas that change weights rather than inputs give their per-candidate parameters for the
whole population in one computation (`Delta.parameters`); each chunk's forward runs inside
`Delta.patched` with that chunk's rows, the prompt slot of each position (deep prompts act
there inside the model) and the chunk's `Routing` (AdaMix routes examples of the search
split to copies). Deltas that change modules every token goes through
(`Delta.changes_prefix`) turn prefix reuse off.

`Engine.gradient` (off unless the server allows it) runs the same buckets with autograd
and returns d loss / d z per candidate, for white-box comparisons.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from backbone_server.batching import Batcher, Bucket, RangeCache
from backbone_server.deltas import Delta, DeltaConfig, Routing, build_delta
from backbone_server.deltas.budget import MAX_DELTA_BYTES
from backbone_server.encoding import TemplateEncoder
from backbone_server.errors import Cancelled, InvalidArgument, PermissionDenied, ResourceExhausted, shown
from backbone_server.fairness import FairTurns
from backbone_server.generation import Generation, GenerationResult
from backbone_server.memory import plan_memory, prefix_store_bytes
from backbone_server.models import Backbone
from backbone_server.scheduler import (
    CPU_MERGE_TOKENS,
    DEFAULT_WINDOW_MS,
    ChunkStep,
    DecodeStep,
    ForwardMerger,
    StartStep,
)
from backbone_server.scoring import (
    LOSSES,
    Chunk,
    PopulationGradients,
    PopulationScores,
    Scorer,
    TokenBounds,
    example_losses,
    out_of_memory,
)
from backbone_server.sessions import SessionRegistry, SessionState, encode_splits
from backbone_server.store import ServerStore
from backbone_server.subspace import DEFAULT_MAX_BYTES, MAX_UPLOADED, Subspace, check_name, subspace_from_bytes
from backbone_server.tenants import Tenant, open_tenant

log = logging.getLogger(__name__)

MAX_POPULATION = 4096
MAX_SCORED = 256  # single-candidate scores a session keeps
MAX_BUILT = 8  # deltas of transient sessions (stored deltas in use) kept built
# (candidate, example) rows one Evaluate may ask for: a bigger request is split by the
# client into several (a test pass in slices), so that the caller's deadline means something.
MAX_ROWS_PER_CALL = 2**18
MAX_EXAMPLES_PER_SESSION = 200_000  # all splits together, unless the tenant's limit is lower
DEFAULT_SESSION_TTL_S = 30 * 60


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the bounds GetInfo reports)."""

    max_population: int = MAX_POPULATION
    max_rows_per_call: int = MAX_ROWS_PER_CALL
    max_examples_per_session: int = MAX_EXAMPLES_PER_SESSION
    max_sessions: int = 64
    session_ttl_s: float = DEFAULT_SESSION_TTL_S
    max_delta_bytes: int = MAX_DELTA_BYTES  # what one session's delta may pin (projections, starts)


class Engine:
    def __init__(self, backbone: Backbone, max_batch_tokens: int = 0, max_sessions: int = 64,
                 prefix_cache_bytes: int = 0, prefix_reuse: bool = True,
                 allow_gradients: bool = False, subspaces: dict | None = None,
                 allow_subspace_uploads: bool = False, max_subspace_bytes: int = DEFAULT_MAX_BYTES,
                 limits: Limits | None = None, range_cache: RangeCache | None = None,
                 store: ServerStore | None = None, batch_window_ms: float | None = None,
                 merge_max_tokens: int | None = None):
        if max_batch_tokens < 0:
            raise ValueError("max_batch_tokens must be positive (or 0 to derive it from free memory)")
        self.backbone = backbone
        self.memory_plan = plan_memory(backbone, max_batch_tokens)
        log.info("memory plan: %s", self.memory_plan.reason)
        self.bounds = TokenBounds(self.memory_plan.max_batch_tokens, self.memory_plan.gradient_batch_tokens)
        self.prefix_reuse = prefix_reuse
        self.allow_gradients = allow_gradients
        self.subspaces = dict(subspaces or {})  # name -> backbone_server.subspace.Subspace
        self.allow_subspace_uploads = allow_subspace_uploads
        self.max_subspace_bytes = max_subspace_bytes
        self.uploaded_subspaces = 0
        self.limits = limits or Limits(max_sessions=max_sessions)
        self.store = store or ServerStore()
        self.batcher = Batcher(backbone, prefix_cache_bytes or prefix_store_bytes(backbone), range_cache)
        self.sessions = SessionRegistry(self.limits.max_sessions, self.limits.session_ttl_s,
                                        on_drop=lambda session: self.batcher.ranges.drop_session(session.id))
        self.scorer = Scorer(backbone, self.bounds)
        self.scorer.probe_attention()
        self.memo_hits = 0
        # Everything that runs the model takes its turn here, one step at a time.
        self.turns = FairTurns()
        self._built: OrderedDict[str, Delta] = OrderedDict()  # transient sessions' deltas, by config
        # Steps of different requests that can share a forward run as one (0 ms: never).
        # None: on a GPU only; on a CPU merged forwards gain little (docs/performance.md)
        # and they round differently from a request alone. A CPU's forwards stop getting
        # cheaper per token at about CPU_MERGE_TOKENS; a GPU's merge up to the memory bound.
        on_gpu = backbone.device.type == "cuda"
        if batch_window_ms is None:
            batch_window_ms = DEFAULT_WINDOW_MS if on_gpu else 0.0
        if merge_max_tokens is None:
            merge_max_tokens = 0 if on_gpu else CPU_MERGE_TOKENS
        self.merger = ForwardMerger(self.scorer, self.turns, batch_window_ms / 1e3, merge_max_tokens)

    @property
    def max_batch_tokens(self) -> int:
        return self.bounds.inference

    @property
    def gradient_batch_tokens(self) -> int:
        return self.bounds.gradient

    # ---- sessions -------------------------------------------------------------------

    def create_session(self, splits: dict[str, list[tuple[str, str, int]]], template: str,
                       verbalizer: list[str], delta_config: DeltaConfig, truncate: bool = False,
                       tenant: Tenant | None = None, cancelled: Callable[[], bool] | None = None) -> SessionState:
        tenant = tenant or open_tenant()
        self.sessions.check_capacity(tenant)  # early, before tokenising; again when registering
        session = self._new_session(splits, template, verbalizer, delta_config, truncate, tenant, cancelled)
        self.sessions.add(session, tenant)
        return session

    def examples_bound(self, tenant: Tenant) -> int:
        """Examples one of the tenant's sessions may hold: its own limit, within the server's."""
        return min(filter(None, (tenant.max_examples, self.limits.max_examples_per_session)))

    def transient_session(self, splits: dict[str, list[tuple[str, str, int]]], template: str,
                          verbalizer: list[str], delta_config: DeltaConfig, truncate: bool, tenant: Tenant,
                          cancelled: Callable[[], bool] | None = None) -> SessionState:
        """A session for one call (Predict, Generate), not registered; its delta is reused
        from the last few built (`MAX_BUILT`), since a stored delta is used call after call."""
        return self._new_session(splits, template, verbalizer, delta_config, truncate, tenant, cancelled,
                                 reuse_delta=True)

    def score_transient(self, session: SessionState, split: str, z: np.ndarray, tenant: Tenant,
                        cancelled: Callable[[], bool] | None = None) -> PopulationScores:
        """`evaluate` on a transient session: metered the same way, its batches not kept."""
        selected = session.select(split, 0, 0)
        z = self._check_population(z, session.delta.z_dim)
        self._check_rows(len(z), len(selected))
        try:
            with self.metered(tenant, len(z), len(selected)), self.merger.request():
                return self._evaluate(session, split, 0, selected, z, tenant, cancelled)
        finally:
            self.batcher.ranges.drop_session(session.id)

    def run_generation(self, generation: Generation, tenant: Tenant,
                       cancelled: Callable[[], bool] | None = None) -> list[GenerationResult]:
        """Runs a Generation one forward per turn of the tenant: the input, then one token
        step at a time, each merged with other requests' inputs (`StartStep`) and token
        steps (`DecodeStep`) where the window is open and its delta allows."""
        bound = self.bounds.inference
        with self.merger.request():
            logits = self.merger.run(StartStep(self.scorer, generation), tenant.name, bound, cancelled,
                                     generation.starts_mergeable)
            mergeable = generation.mergeable
            while (chosen := generation.take(logits)) is not None:
                if cancelled is not None and cancelled():
                    raise Cancelled("the caller went away; the rest of the texts were not generated")
                logits = self.merger.run(DecodeStep(self.scorer, generation, chosen), tenant.name, bound, cancelled,
                                         mergeable)
        return generation.results

    def _new_session(self, splits: dict[str, list[tuple[str, str, int]]], template: str, verbalizer: list[str],
                     delta_config: DeltaConfig, truncate: bool, tenant: Tenant,
                     cancelled: Callable[[], bool] | None, reuse_delta: bool = False) -> SessionState:
        examples = sum(len(split) for split in splits.values())
        bound = self.examples_bound(tenant)
        if examples > bound:
            which = "tenant's (max_examples)" if bound == tenant.max_examples else "server's"
            raise ResourceExhausted(f"the session holds {examples} examples, more than the {which} limit of {bound} "
                                    "per session; score the test set in a session of its own")
        encoder = TemplateEncoder(self.backbone.tokenizer, template, self.backbone.architecture,
                                  delta_config.prompt_length, self.backbone.max_length)
        verbalizer_ids, word_classes = encoder.verbalizer_ids(list(verbalizer))
        encoded = encode_splits(encoder, splits, len(verbalizer), truncate)
        # Some kinds run the model to build their delta (a deep prompt's start): that is a
        # step like any other, never beside another request's forward and its hooks.
        delta = self._built.get(repr(delta_config)) if reuse_delta else None
        if delta is None:
            with self.turns.turn(tenant.name, cancelled):
                delta = build_delta(delta_config, self.backbone, self.subspaces, self.limits.max_delta_bytes)
            if reuse_delta:
                self._built[repr(delta_config)] = delta
                while len(self._built) > MAX_BUILT:
                    self._built.popitem(last=False)
        if delta.kv_prompt and self.backbone.architecture == "causal":
            _check_read_after_the_prompt(encoded, delta.prompt_length)
        session = SessionState(
            id=uuid.uuid4().hex,
            encoder=encoder,
            delta=delta,
            verbalizer_ids=torch.tensor(verbalizer_ids, device=self.backbone.device),
            word_classes=(torch.tensor(word_classes, device=self.backbone.device)
                          if len(word_classes) > len(verbalizer) else None),
            splits=encoded,
            prefix_reuse=self.prefix_reuse and self.backbone.architecture == "causal"
            and not delta.changes_prefix
            and any(e.before for examples in encoded.values() for e in examples),
            truncated_examples=sum(e.truncated for examples in encoded.values() for e in examples),
            tenant=tenant.name,
        )
        return session

    def host_subspace(self, name: str, data: bytes) -> Subspace:
        """Hosts an uploaded subspace file under `name` (off unless the operator allows it)."""
        if not self.allow_subspace_uploads:
            raise PermissionDenied("this server hosts only the subspaces its operator gave it (--subspace); start it "
                                   "with --allow-subspace-uploads to accept uploads")
        check_name(name)
        if self.uploaded_subspaces >= MAX_UPLOADED:
            raise ResourceExhausted(f"this server holds {MAX_UPLOADED} uploaded subspaces already")
        subspace = subspace_from_bytes(data, self.max_subspace_bytes)
        with self.turns.turn("subspaces"):  # sessions being built read the table
            if name in self.subspaces:
                raise InvalidArgument(f"a subspace named {name!r} is hosted already; choose another name")
            self.subspaces[name] = subspace
            self.uploaded_subspaces += 1
        log.info("hosting uploaded subspace %r: %s", name, subspace.describe())
        return subspace

    def get_session(self, session_id: str, tenant: Tenant | None = None) -> SessionState:
        return self.sessions.get(session_id, tenant or open_tenant())

    def close_session(self, session_id: str, tenant: Tenant | None = None) -> None:
        self.sessions.close(session_id, tenant or open_tenant())

    def in_turns(self, steps: Iterator, tenant: Tenant, cancelled: Callable[[], bool] | None) -> Iterator:
        """The items of a generator that runs the model, each computed in a turn of its own."""
        while True:
            with self.turns.turn(tenant.name, cancelled):
                if cancelled is not None and cancelled():
                    raise Cancelled("the caller went away; the rest of the request was not computed")
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item

    def _forward_in_turn(self, tenant: Tenant, cancelled: Callable[[], bool] | None) -> Callable:
        """How a request's chunk runs: merged with other requests' where it can share a
        forward (`ForwardMerger`), else alone; either way in a turn of the request's tenant."""
        def forward(session, bucket, group, group_params, prefix, routing):
            if cancelled is not None and cancelled():
                raise Cancelled("the caller went away; the rest of the request was not computed")
            step = ChunkStep(self.scorer, Chunk(session, bucket, group, group_params, prefix, routing))
            return self.merger.run(step, tenant.name, self.bounds.inference, cancelled,
                                   self.scorer.mergeable(session, bucket, group_params, prefix))
        return forward

    def _check_rows(self, population: int, examples: int) -> None:
        rows = population * examples
        if rows > self.limits.max_rows_per_call:
            raise ResourceExhausted(
                f"{population} candidates x {examples} examples = {rows} rows in one call, more than this server's "
                f"{self.limits.max_rows_per_call}; score fewer examples per call (start, count) or fewer candidates")

    def metered(self, tenant: Tenant, population: int, examples: int):
        """A request's use of the tenant's quota: one API call per candidate."""
        return self.store.metered(tenant, population, population * examples)

    # ---- evaluation -----------------------------------------------------------------

    def evaluate(self, session_id: str, split: str, z: np.ndarray, start: int = 0, count: int = 0,
                 tenant: Tenant | None = None, cancelled: Callable[[], bool] | None = None) -> PopulationScores:
        """Scores of every candidate of z on examples [start, start + count) of the split,
        metered to the tenant, one step of the model at a time (`FairTurns`)."""
        tenant = tenant or open_tenant()
        with self.sessions.held(session_id, tenant) as session:
            selected = session.select(split, start, count)
            z = self._check_population(z, session.delta.z_dim)
            self._check_rows(len(z), len(selected))
            with self.metered(tenant, len(z), len(selected)), self.merger.request():
                return self._evaluate(session, split, start, selected, z, tenant, cancelled)

    def _evaluate(self, session: SessionState, split: str, start: int, selected: list, z: np.ndarray,
                  tenant: Tenant, cancelled: Callable[[], bool] | None) -> PopulationScores:
        key = (split, start, len(selected), z.tobytes()) if len(z) == 1 else None
        with torch.inference_mode():
            if key in session.scored:
                self.memo_hits += 1
                session.scored.move_to_end(key)
                return session.scored[key]
            with self.turns.turn(tenant.name, cancelled):
                prompts, params = self._delta_of(session, z)
            logits = self._empty_logits(session, len(z), len(selected))
            tokens = self.bounds.inference
            buckets = self.batcher.buckets(session, split, start, selected, tokens)
            forward = self._forward_in_turn(tenant, cancelled)
            for bucket, prefix in self.in_turns(buckets, tenant, cancelled):
                chunks = self.scorer.score_chunks(session, bucket, prompts, params, prefix, tokens,
                                                  _routing(split, start, bucket), forward)
                logits[:, bucket.index] = torch.cat([chunk for _, chunk in chunks])
            scores = PopulationScores(logits, self._labels(selected))
            if key is not None:
                session.scored[key] = scores
                if len(session.scored) > MAX_SCORED:
                    session.scored.popitem(last=False)
            return scores

    def _delta_of(self, session: SessionState, z: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompts and parameters of a population (inference): a single candidate of
        the last population scored is taken from it (bit-exact: projections do not depend
        on their population), a population computed and kept for its candidates."""
        if len(z) == 1 and z.tobytes() in session.recent_rows:
            return session.recent_rows[z.tobytes()]
        population = torch.tensor(z, device=self.backbone.device)
        prompts = session.delta.prompts(population)
        params = session.delta.parameters(population)
        if len(z) > 1:
            session.recent_rows = {row.tobytes(): (prompts[i:i + 1], None if params is None else params[i:i + 1])
                                   for i, row in enumerate(z)}
        return prompts, params

    def cache_report(self) -> str:
        """What the caches saved, in words (GetInfo)."""
        return f"{self.batcher.store.report()}; single-candidate scores reused: {self.memo_hits}"

    def gradient(self, session_id: str, split: str, z: np.ndarray, start: int = 0, count: int = 0,
                 loss: str = "ce", tenant: Tenant | None = None,
                 cancelled: Callable[[], bool] | None = None) -> PopulationGradients:
        """The mean loss over the selected examples and its gradient with respect to each z.

        Candidates are independent, so one backward of the summed losses gives every
        row's gradient. Each chunk is differentiated as soon as it is scored, into the
        prompts and module parameters (leaves), so activations of only one chunk are
        alive at a time; their gradients are then carried back through the projection to z.
        """
        self.check_gradients_allowed()
        if loss not in LOSSES:
            raise InvalidArgument(f"unknown loss {shown(loss)}; choose from {', '.join(LOSSES)}")
        tenant = tenant or open_tenant()
        with self.sessions.held(session_id, tenant) as session:
            selected = session.select(split, start, count)
            z = self._check_population(z, session.delta.z_dim)
            self._check_rows(len(z), len(selected))
            with self.metered(tenant, len(z), len(selected)), self.turns.turn(tenant.name, cancelled):
                return self._gradient(session, split, z, selected, start, loss)

    def check_gradients_allowed(self) -> None:
        if not self.allow_gradients:
            raise PermissionDenied(
                "gradients are disabled on this server (it is a black box); "
                "start it with --allow-gradients for white-box comparisons"
            )

    def _gradient(self, session: SessionState, split: str, z: np.ndarray, selected: list, start: int,
                  loss: str) -> PopulationGradients:
        labels = self._labels(selected)
        with torch.enable_grad():
            population = torch.tensor(z, device=self.backbone.device, requires_grad=True)
            prompts = session.delta.prompts(population)
            params = session.delta.parameters(population)
            prompt_leaf = prompts.detach().requires_grad_()
            param_leaf = None if params is None else params.detach().requires_grad_()
            logits = self._empty_logits(session, len(z), len(selected))
            tokens = self.bounds.gradient
            for bucket, prefix in self.batcher.buckets(session, split, start, selected, tokens):
                for first, chunk in self.scorer.score_chunks(session, bucket, prompt_leaf, param_leaf, prefix,
                                                             tokens, _routing(split, start, bucket)):
                    p, size, classes = chunk.shape
                    ce, hinge = example_losses(chunk.reshape(p * size, classes), labels[bucket.index].repeat(p))
                    # Sum over candidates of their mean over all selected examples.
                    try:
                        ((ce if loss == "ce" else hinge).sum() / len(selected)).backward()
                    except Exception as error:
                        if not out_of_memory(error):
                            raise
                        self.bounds.gradient = max(1, self.bounds.gradient // 2)
                        raise ResourceExhausted(
                            "the backward ran out of device memory; the server lowered its gradient batch "
                            f"to {self.bounds.gradient} tokens, retry the call"
                        ) from None
                    logits[first:first + p, bucket.index] = chunk.detach()
            outputs, grads = [], []
            for output, leaf in ((prompts, prompt_leaf), (params, param_leaf)):
                if output is not None and output.requires_grad and leaf.grad is not None:
                    outputs.append(output)
                    grads.append(leaf.grad)
            if outputs:
                torch.autograd.backward(outputs, grads)
        scores = PopulationScores(logits, labels)
        return PopulationGradients(
            loss=scores.ce_loss if loss == "ce" else scores.hinge_loss,
            accuracy=scores.accuracy,
            grad=population.grad.float().cpu().numpy(),
            num_examples=len(selected),
        )

    def _labels(self, selected) -> torch.Tensor:
        return torch.tensor([e.label for e in selected], device=self.backbone.device)

    def _empty_logits(self, session: SessionState, population: int, examples: int) -> torch.Tensor:
        return torch.empty(population, examples, session.num_classes,
                           device=self.backbone.device, dtype=torch.float32)

    def _check_population(self, z: np.ndarray, dim: int) -> np.ndarray:
        if z.ndim != 2 or z.shape[1] != dim or z.shape[0] < 1:
            raise InvalidArgument(f"z must have shape (P, {dim}) with P >= 1, got {tuple(z.shape)}")
        if z.shape[0] > self.limits.max_population:
            raise ResourceExhausted(f"population {z.shape[0]} exceeds this server's limit of "
                                    f"{self.limits.max_population} candidates per call")
        if not np.isfinite(z).all():
            bad = np.argwhere(~np.isfinite(z))[0]
            raise InvalidArgument(f"z holds a non-finite value (first at candidate {bad[0]}, coordinate {bad[1]})")
        return np.ascontiguousarray(z, dtype=np.float32)


def _check_read_after_the_prompt(splits: dict, prompt_length: int) -> None:
    """A causal model reads the verbalizer at the last token before {mask}; virtual tokens
    (keys and values only) have no output there."""
    for name, examples in splits.items():
        for index, example in enumerate(examples):
            if example.read < len(example.before) + prompt_length:
                raise InvalidArgument(
                    f"split {name!r}, example {index}: the template has no token between {{prompt}} and {{mask}}; "
                    "a causal model reads the verbalizer from the token before {mask}, and a prefix's virtual "
                    "tokens have no output of their own: put at least one token of the template after {prompt}")


def _routing(split: str, start: int, bucket: Bucket) -> Routing:
    """The split and the bucket's example indices within it."""
    return Routing(split, tuple(start + i for i in bucket.indices))
