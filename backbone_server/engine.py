"""Scoring a population of deltas on a task split: pure torch, no gRPC.

The hot path is `Engine.evaluate`: every candidate of the population is scored on every
example of the split in as few forwards as the memory bound allows. Examples are sorted
by length and grouped into buckets (little padding); within a bucket all candidates run
in one batched forward, split into candidate chunks only when the bucket times the
population would exceed `max_batch_tokens` (from the memory model in `memory.py` unless
the operator sets it; a forward that runs out of memory anyway is retried in halves).

Causal models with text before the prompt take the prefix-reuse path: the tokens ahead
of the prompt do not depend on the candidate, so their keys and values are computed once
per bucket (and kept for later calls while they fit the session's cache budget) and each
candidate runs only the prompt and the tokens after it. Deltas that change modules
(`Delta.changes_prefix`) make every token depend on the candidate and turn it off.

Deltas that change weights rather than inputs (LoRA, bias shifts) give their
per-candidate parameters for the whole population in one computation
(`Delta.parameters`); each chunk's forward then runs inside `Delta.patched` with that
chunk's rows, which makes the patched modules apply candidate i to rows
i * B .. (i + 1) * B - 1 of the candidate-major batch. `patched` also gets the prompt
slot of each position of the bucket's rows (deep prompts act at those positions inside
the model; they leave the tokens ahead of the prompt alone and keep prefix reuse).
Deltas with `routed = True` (AdaMix) also get a `Routing`: the split's name and the
chunk's example indices within it.

`Engine.gradient` (off unless the server allows it) runs the same buckets with autograd
and returns d loss / d z per candidate, for white-box comparisons.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from backbone_server.deltas import Delta, build_delta
from backbone_server.deltas.base import DeltaConfig, Routing
from backbone_server.encoding import EncodedExample, TemplateEncoder
from backbone_server.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from backbone_server.memory import plan_memory
from backbone_server.models import Backbone

log = logging.getLogger(__name__)

HINGE_MARGIN = 1.0
MAX_POPULATION = 4096
LOSSES = ("ce", "hinge")
MAX_CACHED_RANGES = 64  # per session: (split, example range, token bound) bucketings kept


@dataclass
class Scores:
    """Per-candidate results of one evaluation, as float32 numpy arrays."""

    ce_loss: np.ndarray  # (P,)
    hinge_loss: np.ndarray  # (P,)
    accuracy: np.ndarray  # (P,)
    logits: np.ndarray  # (P, N, C) verbalizer logits


@dataclass
class Gradients:
    """Per-candidate loss, accuracy and d loss / d z, as float32 numpy arrays."""

    loss: np.ndarray  # (P,)
    accuracy: np.ndarray  # (P,)
    grad: np.ndarray  # (P, d)
    num_examples: int


@dataclass
class Session:
    id: str
    encoder: TemplateEncoder
    delta: Delta
    verbalizer_ids: torch.Tensor  # (C,)
    splits: dict[str, list[EncodedExample]]
    prefix_reuse: bool
    truncated_examples: int
    prefix_cache: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    prefix_cache_bytes: int = 0
    # Padded device tensors of each evaluated range, built once: a generation then starts
    # its forwards without host work or host-to-device copies.
    bucket_cache: dict[tuple, list[_Bucket]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Bucket:
    """Examples (indices into the evaluated range) scored together."""

    indices: list[int]
    index: torch.Tensor  # the same, on the device
    reuse: bool
    prefix_ids: torch.Tensor | None  # (B, Lp)
    prefix_mask: torch.Tensor | None  # (B, Lp)
    row_ids: torch.Tensor  # (B, Ls): token ids, prompt slot i as -(i + 1), padding as pad id
    row_mask: torch.Tensor  # (B, Ls)
    read: torch.Tensor  # (B,) position in the row whose output is scored
    prefix_lengths: torch.Tensor  # (B,)

    @property
    def tokens_per_candidate(self) -> int:
        prefix = self.prefix_ids.shape[1] if self.reuse else 0
        return len(self.indices) * (prefix + self.row_ids.shape[1])


class Engine:
    def __init__(self, backbone: Backbone, max_batch_tokens: int = 0, max_sessions: int = 64,
                 prefix_cache_bytes: int = 512 * 2**20, prefix_reuse: bool = True,
                 allow_gradients: bool = False):
        if max_batch_tokens < 0:
            raise ValueError("max_batch_tokens must be positive (or 0 to derive it from free memory)")
        self.backbone = backbone
        self.memory_plan = plan_memory(backbone, max_batch_tokens)
        self.max_batch_tokens = self.memory_plan.max_batch_tokens
        self.gradient_batch_tokens = self.memory_plan.gradient_batch_tokens
        log.info("memory plan: %s", self.memory_plan.reason)
        self.max_sessions = max_sessions
        self.prefix_cache_limit = prefix_cache_bytes
        self.prefix_reuse = prefix_reuse
        self.allow_gradients = allow_gradients
        self.sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        # One forward at a time: concurrent forwards would only fight over the same cores.
        self._compute_lock = threading.Lock()
        pad = backbone.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (backbone.tokenizer.eos_token_id or 0)

    # ---- sessions -------------------------------------------------------------------

    def create_session(self, splits: dict[str, list[tuple[str, str, int]]], template: str,
                       verbalizer: list[str], delta_config: DeltaConfig, truncate: bool = False) -> Session:
        if not splits:
            raise InvalidArgument("a session needs at least one split")
        with self._sessions_lock:
            self._check_capacity()  # early, before tokenising; again when registering
        encoder = TemplateEncoder(self.backbone.tokenizer, template, self.backbone.architecture,
                                  delta_config.prompt_length, self.backbone.max_length)
        verbalizer_ids = encoder.verbalizer_ids(list(verbalizer))
        encoded: dict[str, list[EncodedExample]] = {}
        for name, examples in splits.items():
            if not name:
                raise InvalidArgument("every split needs a name")
            if not examples:
                raise InvalidArgument(f"split {name!r} is empty")
            encoded[name] = []
            for index, (text_a, text_b, label) in enumerate(examples):
                if not 0 <= label < len(verbalizer_ids):
                    raise InvalidArgument(
                        f"split {name!r}, example {index}: label {label} is not in 0..{len(verbalizer_ids) - 1}"
                    )
                encoded[name].append(encoder.encode(text_a, text_b, label, truncate, index))
        delta = build_delta(delta_config, self.backbone)
        session = Session(
            id=uuid.uuid4().hex,
            encoder=encoder,
            delta=delta,
            verbalizer_ids=torch.tensor(verbalizer_ids, device=self.backbone.device),
            splits=encoded,
            prefix_reuse=self.prefix_reuse and self.backbone.architecture == "causal"
            and not delta.changes_prefix
            and any(e.before for examples in encoded.values() for e in examples),
            truncated_examples=sum(e.truncated for examples in encoded.values() for e in examples),
        )
        with self._sessions_lock:
            self._check_capacity()
            self.sessions[session.id] = session
        return session

    def _check_capacity(self) -> None:
        if len(self.sessions) >= self.max_sessions:
            raise ResourceExhausted(f"the server holds {self.max_sessions} sessions already; close one first")

    def get_session(self, session_id: str) -> Session:
        with self._sessions_lock:
            session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r} (closed, or created on another server)")
        return session

    def close_session(self, session_id: str) -> None:
        with self._sessions_lock:
            if self.sessions.pop(session_id, None) is None:
                raise NotFound(f"no session {session_id!r}")

    # ---- evaluation -----------------------------------------------------------------

    def evaluate(self, session_id: str, split: str, z: np.ndarray, start: int = 0, count: int = 0) -> Scores:
        session, selected, labels = self._select(session_id, split, start, count)
        z = self._check_population(z, session.delta.z_dim)
        with self._compute_lock, torch.inference_mode():
            population = torch.tensor(z, device=self.backbone.device)
            prompts = session.delta.prompts(population)
            params = session.delta.parameters(population)
            logits = self._empty_logits(session, len(z), len(selected))
            for bucket, prefix in self._bucket_inputs(session, split, start, selected, self.max_batch_tokens):
                chunks = self._score_chunks(session, bucket, prompts, params, prefix, self.max_batch_tokens,
                                            _routing(session, split, start, bucket))
                logits[:, bucket.index] = torch.cat([chunk for _, chunk in chunks])
            return _scores(logits, labels)

    def gradient(self, session_id: str, split: str, z: np.ndarray, start: int = 0, count: int = 0,
                 loss: str = "ce") -> Gradients:
        """The mean loss over the selected examples and its gradient with respect to each z.

        Candidates are independent, so one backward of the summed losses gives every
        row's gradient. Each chunk is differentiated as soon as it is scored, into the
        prompts and module parameters (leaves), so activations of only one chunk are
        alive at a time; their gradients are then carried back through the projection to z.
        """
        if not self.allow_gradients:
            raise PermissionDenied(
                "gradients are disabled on this server (it is a black box); "
                "start it with --allow-gradients for white-box comparisons"
            )
        if loss not in LOSSES:
            raise InvalidArgument(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        session, selected, labels = self._select(session_id, split, start, count)
        z = self._check_population(z, session.delta.z_dim)
        with self._compute_lock, torch.enable_grad():
            population = torch.tensor(z, device=self.backbone.device, requires_grad=True)
            prompts = session.delta.prompts(population)
            params = session.delta.parameters(population)
            prompt_leaf = prompts.detach().requires_grad_()
            param_leaf = None if params is None else params.detach().requires_grad_()
            logits = self._empty_logits(session, len(z), len(selected))
            tokens = self.gradient_batch_tokens
            for bucket, prefix in self._bucket_inputs(session, split, start, selected, tokens):
                routing = _routing(session, split, start, bucket)
                for first, chunk in self._score_chunks(session, bucket, prompt_leaf, param_leaf, prefix, tokens,
                                                       routing):
                    p, size, classes = chunk.shape
                    ce, hinge = _example_losses(chunk.reshape(p * size, classes), labels[bucket.index].repeat(p))
                    # Sum over candidates of their mean over all selected examples.
                    try:
                        ((ce if loss == "ce" else hinge).sum() / len(selected)).backward()
                    except Exception as error:
                        if not _out_of_memory(error):
                            raise
                        self.gradient_batch_tokens = max(1, self.gradient_batch_tokens // 2)
                        raise ResourceExhausted(
                            "the backward ran out of device memory; the server lowered its gradient batch "
                            f"to {self.gradient_batch_tokens} tokens, retry the call"
                        ) from None
                    logits[first:first + p, bucket.index] = chunk.detach()
            outputs, grads = [], []
            for output, leaf in ((prompts, prompt_leaf), (params, param_leaf)):
                if output is not None and output.requires_grad and leaf.grad is not None:
                    outputs.append(output)
                    grads.append(leaf.grad)
            if outputs:
                torch.autograd.backward(outputs, grads)
        scores = _scores(logits, labels)
        return Gradients(
            loss=scores.ce_loss if loss == "ce" else scores.hinge_loss,
            accuracy=scores.accuracy,
            grad=population.grad.float().cpu().numpy(),
            num_examples=len(selected),
        )

    def _select(self, session_id: str, split: str, start: int, count: int
                ) -> tuple[Session, list[EncodedExample], torch.Tensor]:
        """The session, the examples [start, start + count) of the split and their labels."""
        session = self.get_session(session_id)
        if split not in session.splits:
            raise NotFound(f"session has no split {split!r}; it has {', '.join(session.splits)}")
        examples = session.splits[split]
        if start < 0 or count < 0 or start >= len(examples):
            raise InvalidArgument(
                f"example range start={start} count={count} is outside split {split!r} of {len(examples)}"
            )
        stop = len(examples) if count == 0 else min(len(examples), start + count)
        selected = examples[start:stop]
        return session, selected, torch.tensor([e.label for e in selected], device=self.backbone.device)

    def _empty_logits(self, session: Session, population: int, examples: int) -> torch.Tensor:
        return torch.empty(population, examples, len(session.verbalizer_ids),
                           device=self.backbone.device, dtype=torch.float32)

    def _bucket_inputs(self, session: Session, split: str, start: int, selected: list[EncodedExample],
                       tokens: int):
        """Each bucket (its `index`: its examples' positions in `selected`) with its prefix states."""
        key = (split, start, start + len(selected), tokens)
        buckets = session.bucket_cache.get(key)
        if buckets is None:
            buckets = self._buckets(session, selected, tokens)
            if len(session.bucket_cache) < MAX_CACHED_RANGES:
                session.bucket_cache[key] = buckets
        for bucket in buckets:
            cache_key = (split, start, start + len(selected), bucket.indices[0], len(bucket.indices))
            prefix = self._prefix_states(session, bucket, cache_key) if bucket.reuse else None
            yield bucket, prefix

    @staticmethod
    def _check_population(z: np.ndarray, dim: int) -> np.ndarray:
        if z.ndim != 2 or z.shape[1] != dim or z.shape[0] < 1:
            raise InvalidArgument(f"z must have shape (P, {dim}) with P >= 1, got {tuple(z.shape)}")
        if z.shape[0] > MAX_POPULATION:
            raise ResourceExhausted(f"population {z.shape[0]} exceeds the limit of {MAX_POPULATION}")
        if not np.isfinite(z).all():
            bad = np.argwhere(~np.isfinite(z))[0]
            raise InvalidArgument(f"z holds a non-finite value (first at candidate {bad[0]}, coordinate {bad[1]})")
        return np.ascontiguousarray(z, dtype=np.float32)

    def _buckets(self, session: Session, examples: list[EncodedExample], tokens: int) -> list[_Bucket]:
        """Length-sorted groups of examples, each at most `tokens` for one candidate."""
        n = session.delta.prompt_length
        order = sorted(range(len(examples)), key=lambda i: examples[i].length(n))
        groups: list[list[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * examples[i].length(n) <= tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return [self._make_bucket(session, [examples[i] for i in group], group) for group in groups]

    def _make_bucket(self, session: Session, examples: list[EncodedExample], indices: list[int]) -> _Bucket:
        n = session.delta.prompt_length
        slots = list(range(-1, -n - 1, -1))
        # A bucket mixing empty and non-empty prefixes would leave fully masked prefix rows.
        reuse = session.prefix_reuse and all(e.before for e in examples)
        device = self.backbone.device
        if reuse:
            prefix_ids, prefix_mask = self._pad([list(e.before) for e in examples])
            rows = [slots + list(e.after) for e in examples]
            read = [e.read - len(e.before) for e in examples]
            prefix_lengths = [len(e.before) for e in examples]
        else:
            prefix_ids = prefix_mask = None
            rows = [list(e.before) + slots + list(e.after) for e in examples]
            read = [e.read for e in examples]
            prefix_lengths = [0] * len(examples)
        row_ids, row_mask = self._pad(rows)
        return _Bucket(
            indices=indices,
            index=torch.tensor(indices, device=device),
            reuse=reuse,
            prefix_ids=prefix_ids,
            prefix_mask=prefix_mask,
            row_ids=row_ids,
            row_mask=row_mask,
            read=torch.tensor(read, device=device),
            prefix_lengths=torch.tensor(prefix_lengths, device=device),
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

    def _prefix_states(self, session: Session, bucket: _Bucket, key: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of the candidate-independent tokens, per layer."""
        cached = session.prefix_cache.get(key)
        if cached is not None:
            return cached
        # Constants even on the gradient path: nothing before the prompt depends on z.
        with torch.no_grad():
            output = self.backbone.body(input_ids=bucket.prefix_ids, attention_mask=bucket.prefix_mask,
                                        use_cache=True)
        states = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in states)
        if session.prefix_cache_bytes + size <= self.prefix_cache_limit:
            session.prefix_cache[key] = states
            session.prefix_cache_bytes += size
        return states

    def _score_chunks(self, session: Session, bucket: _Bucket, prompts: torch.Tensor,
                      params: torch.Tensor | None, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None,
                      tokens: int, routing: Routing | None = None):
        """(P, n, h) prompts and (P, D) module parameters (or None) -> (first candidate,
        (p, B, C) float32 verbalizer logits) for each chunk of candidates that fits
        `tokens`, in order. A chunk that runs out of memory is retried in halves, and
        later calls start from the smaller bound."""
        chunk = max(1, tokens // bucket.tokens_per_candidate)
        first = 0
        while first < len(prompts):
            group = prompts[first:first + chunk]
            group_params = None if params is None else params[first:first + chunk]
            try:
                logits = self._forward_chunk(session, bucket, group, group_params, prefix, routing)
            except Exception as error:
                if not _out_of_memory(error):
                    raise
                if chunk == 1:
                    raise ResourceExhausted(
                        f"one candidate on {len(bucket.indices)} examples does not fit in device memory; "
                        "evaluate fewer examples per call (count) or start the server with a smaller "
                        "--max-batch-tokens"
                    ) from None
                chunk //= 2
                bound = chunk * bucket.tokens_per_candidate
                log.warning("out of memory at %d candidates x %d tokens; retrying with %d candidates",
                            len(group), bucket.tokens_per_candidate, chunk)
                self._release_cached_memory()
                if prompts.requires_grad or (params is not None and params.requires_grad):
                    self.gradient_batch_tokens = min(self.gradient_batch_tokens, bound)
                else:
                    self.max_batch_tokens = min(self.max_batch_tokens, bound)
                continue
            yield first, logits
            first += len(group)

    def _release_cached_memory(self) -> None:
        if self.backbone.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward_chunk(self, session: Session, bucket: _Bucket, group: torch.Tensor,
                       group_params: torch.Tensor | None,
                       prefix: list[tuple[torch.Tensor, torch.Tensor]] | None,
                       routing: Routing | None = None) -> torch.Tensor:
        """(p, n, h) prompts and (p, D) module parameters (or None) of some candidates ->
        (p, B, C) verbalizer logits on the bucket."""
        backbone = self.backbone
        size, width = bucket.row_ids.shape
        slot = bucket.row_ids < 0
        token_embeddings = backbone.embeddings(bucket.row_ids.clamp(min=0))
        slot_index = (-bucket.row_ids - 1).clamp(min=0)
        p = len(group)
        if group.shape[1]:
            # (p, B, Ls, h): each candidate's prompt vectors spliced into the shared rows.
            rows = torch.where(slot[None, :, :, None], group[:, slot_index], token_embeddings[None])
        else:  # no prompt: every candidate reads the same rows
            rows = token_embeddings[None].expand(p, -1, -1, -1)
        rows = rows.reshape(p * size, width, -1)
        mask = bucket.row_mask.repeat(p, 1)
        kwargs = {}
        if prefix is not None:
            mask = torch.cat([bucket.prefix_mask.repeat(p, 1), mask], dim=1)
            positions = bucket.prefix_lengths[:, None] + torch.arange(width, device=rows.device)
            kwargs["position_ids"] = positions.repeat(p, 1)
            kwargs["past_key_values"] = DynamicCache(
                ddp_cache_data=[(k.repeat(p, 1, 1, 1), v.repeat(p, 1, 1, 1)) for k, v in prefix],
                config=backbone.model.config,
            )
        slots = torch.where(slot, slot_index, -1)  # (B, Ls): prompt slot of each position, or -1
        patched = (session.delta.patched(group_params, slots, routing) if session.delta.routed
                   else session.delta.patched(group_params, slots))
        with patched:
            hidden = backbone.body(inputs_embeds=rows, attention_mask=mask, **kwargs).last_hidden_state
        read = bucket.read.repeat(p)
        picked = hidden[torch.arange(p * size, device=hidden.device), read]
        return self._verbalizer_logits(session, picked).view(p, size, -1)

    def _verbalizer_logits(self, session: Session, hidden: torch.Tensor) -> torch.Tensor:
        head = self.backbone.head
        if isinstance(head, torch.nn.Linear):
            # Only the verbalizer's rows of a plain output matrix: skips a (rows x vocab) matmul.
            weight = head.weight[session.verbalizer_ids]
            bias = head.bias[session.verbalizer_ids] if head.bias is not None else None
            return F.linear(hidden, weight, bias).float()
        return head(hidden)[:, session.verbalizer_ids].float()


def _routing(session: Session, split: str, start: int, bucket: _Bucket) -> Routing | None:
    """The split and the bucket's example indices within it, for deltas that route examples."""
    if not session.delta.routed:
        return None
    return Routing(split, tuple(start + i for i in bucket.indices))


def _out_of_memory(error: Exception) -> bool:
    """A device (CUDA) or host allocator running out of memory."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def _example_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) logits and (R,) targets -> each row's cross-entropy and multi-class hinge loss."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values
    return ce, (HINGE_MARGIN + others - true).clamp(min=0)


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> Scores:
    population, count, classes = logits.shape
    targets = labels.repeat(population)
    flat = logits.reshape(population * count, classes)
    ce, hinge = _example_losses(flat, targets)
    accuracy = (flat.argmax(dim=1) == targets).float().view(population, count).mean(dim=1)
    return Scores(
        ce_loss=ce.view(population, count).mean(dim=1).cpu().numpy(),
        hinge_loss=hinge.view(population, count).mean(dim=1).cpu().numpy(),
        accuracy=accuracy.cpu().numpy(),
        logits=logits.cpu().numpy(),
    )
