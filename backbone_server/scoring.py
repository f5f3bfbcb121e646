"""The forward core: a chunk of candidates on one bucket through the model, read out as
verbalizer logits, and the population's losses and accuracies from those logits.

Every candidate of a chunk runs in one batched forward: prompts are spliced into the
bucket's shared rows through `inputs_embeds`, module parameters go in through the delta's
`patched` hooks (candidate-major rows: candidate i holds rows i * B .. (i + 1) * B - 1),
and with prefix reuse the bucket's prefix states stand in for the tokens ahead of the
prompt. A chunk that runs out of memory is retried in halves, and the engine's token
bound (`TokenBounds`) shrinks so that later calls start from the smaller one.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from backbone_server import attention
from backbone_server.batching import Bucket, PrefixStates
from backbone_server.deltas import Delta, Routing
from backbone_server.deltas.hooks import forward_hooks, hidden_of, with_hidden
from backbone_server.errors import ResourceExhausted
from backbone_server.models import Backbone
from backbone_server.sessions import SessionState

log = logging.getLogger(__name__)

HINGE_MARGIN = 1.0
LOSSES = ("ce", "hinge")


@dataclass
class Chunk:
    """Some candidates of one session on one bucket: what one forward scores."""

    session: SessionState
    bucket: Bucket
    group: torch.Tensor  # (p, n, h) prompts
    params: torch.Tensor | None  # (p, D) module parameters, or None
    prefix: PrefixStates | None  # the shared states of the bucket's tokens ahead, if any
    routing: Routing | None = None


@dataclass
class TokenBounds:
    """Rows x tokens one forward may hold: for inference, and with autograd kept for a
    backward. They only shrink, when a forward runs out of memory."""

    inference: int
    gradient: int


class PopulationScores:
    """Per-candidate results of one evaluation, as float32 numpy arrays; the (P, N, C)
    verbalizer logits stay on the device until `logits` is read."""

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor):
        population, count, classes = logits.shape
        targets = labels.repeat(population)
        flat = logits.reshape(population * count, classes)
        ce, hinge = example_losses(flat, targets)
        accuracy = (flat.argmax(dim=1) == targets).float().view(population, count).mean(dim=1)
        self.ce_loss = ce.view(population, count).mean(dim=1).cpu().numpy()  # (P,)
        self.hinge_loss = hinge.view(population, count).mean(dim=1).cpu().numpy()  # (P,)
        self.accuracy = accuracy.cpu().numpy()  # (P,)
        self.num_examples = count
        self._logits = logits
        self._host_logits: np.ndarray | None = None

    @property
    def logits(self) -> np.ndarray:
        """(P, N, C) verbalizer logits, copied to the host on first use."""
        if self._host_logits is None:
            self._host_logits = self._logits.cpu().numpy()
        return self._host_logits


@dataclass
class PopulationGradients:
    """Per-candidate loss, accuracy and d loss / d z, as float32 numpy arrays."""

    loss: np.ndarray  # (P,)
    accuracy: np.ndarray  # (P,)
    grad: np.ndarray  # (P, d)
    num_examples: int


class Scorer:
    def __init__(self, backbone: Backbone, bounds: TokenBounds):
        self.backbone = backbone
        self.bounds = bounds
        self._shared_attention: bool | None = None  # probed on the first prefix bucket
        # Hears each forward: (tokens run, the token bound it ran under, seconds); metrics.
        self.on_forward: Callable[[int, int, float], None] | None = None
        self.forwards = self.rows_run = 0  # forwards run (scoring, generating), and their rows

    def shares_attention(self, bucket: Bucket) -> bool:
        """Whether the bucket's candidates attend to what they share without copies (the
        prefix path of a causal model whose attention takes `attention.shared_attention`)."""
        if not bucket.virtual or self.backbone.architecture != "causal":
            return False
        if self._shared_attention is None:
            self.probe_attention()
        return self._shared_attention

    def probe_attention(self) -> None:
        """Checks once whether this model takes shared attention. The check runs the model
        (and switches its attention while it does), so the engine runs it before it serves
        anyone, not between other requests' steps."""
        if self.backbone.architecture == "causal" and self._shared_attention is None:
            self._shared_attention = attention.supported(self.backbone)
            log.info("shared attention for the prefix path: %s", "on" if self._shared_attention else
                     "off (this model's attention does not take it; the cache path runs instead)")

    def tokens_per_candidate(self, bucket: Bucket) -> int:
        """What one candidate costs a forward on the bucket, in tokens held: its rows, and
        the keys and values ahead of them unless shared attention leaves those uncopied
        (tokens ahead that the candidate changes still run, for each candidate)."""
        if self.shares_attention(bucket):
            ahead = bucket.prefix_ids.shape[1] if bucket.prefix_ids is not None and not bucket.reuse else 0
            return len(bucket.indices) * (ahead + bucket.row_ids.shape[1])
        return bucket.tokens_per_candidate

    def score_chunks(self, session: SessionState, bucket: Bucket, prompts: torch.Tensor,
                     params: torch.Tensor | None, prefix: PrefixStates | None, tokens: int,
                     routing: Routing | None = None, forward: Callable | None = None
                     ) -> Iterator[tuple[int, torch.Tensor]]:
        """(P, n, h) prompts and (P, D) module parameters (or None) -> (first candidate,
        (p, B, C) float32 verbalizer logits) for each chunk of candidates that fits
        `tokens`, in order. `forward` (default `forward_chunk`, same arguments) runs a
        chunk: the engine's runs it in a turn, or merged with other requests' chunks."""
        forward = forward or self.forward_chunk
        per_candidate = self.tokens_per_candidate(bucket)
        chunk = max(1, tokens // per_candidate)
        first = 0
        while first < len(prompts):
            group = prompts[first:first + chunk]
            group_params = None if params is None else params[first:first + chunk]
            try:
                logits = forward(session, bucket, group, group_params, prefix, routing)
            except Exception as error:
                if not out_of_memory(error):
                    raise
                if chunk == 1:
                    raise ResourceExhausted(
                        f"one candidate on {len(bucket.indices)} examples does not fit in device memory; "
                        "evaluate fewer examples per call (count) or start the server with a smaller "
                        "--max-batch-tokens"
                    ) from None
                chunk = len(group) // 2
                bound = chunk * per_candidate
                log.warning("out of memory at %d candidates x %d tokens; retrying with %d candidates",
                            len(group), per_candidate, chunk)
                self._release_cached_memory()
                if prompts.requires_grad or (params is not None and params.requires_grad):
                    self.bounds.gradient = min(self.bounds.gradient, bound)
                else:
                    self.bounds.inference = min(self.bounds.inference, bound)
                continue
            yield first, logits
            first += len(group)

    def _release_cached_memory(self) -> None:
        if self.backbone.device.type == "cuda":
            torch.cuda.empty_cache()

    def forward_chunk(self, session: SessionState, bucket: Bucket, group: torch.Tensor,
                      group_params: torch.Tensor | None, prefix: PrefixStates | None,
                      routing: Routing | None = None) -> torch.Tensor:
        """(p, n, h) prompts and (p, D) module parameters (or None) of some candidates ->
        (p, B, C) verbalizer logits on the bucket."""
        with self.running(len(group) * len(bucket.indices), len(group) * self.tokens_per_candidate(bucket)):
            return self._forward_chunk(session, bucket, group, group_params, prefix, routing)

    def _forward_chunk(self, session: SessionState, bucket: Bucket, group: torch.Tensor,
                       group_params: torch.Tensor | None, prefix: PrefixStates | None,
                       routing: Routing | None) -> torch.Tensor:
        backbone = self.backbone
        slot = bucket.row_ids < 0
        slot_index = (-bucket.row_ids - 1).clamp(min=0)
        p = len(group)
        rows = self.rows(bucket, group)
        width = rows.shape[1]
        kwargs = {}
        if bucket.row_start is not None:
            kwargs["position_ids"] = _positions(bucket, p, width, rows.device)
        slots = torch.where(slot, slot_index, -1)  # (B, Ls): prompt slot of each position, or -1
        with session.delta.patched(group_params, slots, routing):
            if self.shares_attention(bucket):
                shared = self._shared_past(session.delta, bucket, prefix, group_params, p)
                with attention.attending(backbone, shared):
                    hidden = backbone.body(inputs_embeds=rows, use_cache=False, **kwargs).last_hidden_state
                return self._read(session, bucket, hidden, p)
            past, past_mask = self.past(session.delta, bucket, prefix, group_params, p)
            mask = bucket.row_mask.repeat(p, 1)
            if past:
                kwargs["cache"] = DynamicCache(ddp_cache_data=past, config=backbone.model.config)
                mask = torch.cat([past_mask, mask], dim=1)
            hidden = backbone.body(inputs_embeds=rows, attention_mask=mask, **kwargs).last_hidden_state
        return self._read(session, bucket, hidden, p)

    def rows(self, bucket: Bucket, group: torch.Tensor) -> torch.Tensor:
        """(p * B, Ls, h) input embeddings of p candidates on the bucket's rows, candidate-major."""
        size, width = bucket.row_ids.shape
        token_embeddings = self.backbone.embeddings(bucket.row_ids.clamp(min=0))
        p = len(group)
        if group.shape[1]:
            # (p, B, Ls, h): each candidate's prompt vectors spliced into the shared rows.
            slot_index = (-bucket.row_ids - 1).clamp(min=0)
            rows = torch.where((bucket.row_ids < 0)[None, :, :, None], group[:, slot_index], token_embeddings[None])
        else:  # no prompt: every candidate reads the same rows
            rows = token_embeddings[None].expand(p, -1, -1, -1)
        return rows.reshape(p * size, width, -1)

    def mergeable(self, session: SessionState, bucket: Bucket, group_params: torch.Tensor | None,
                  prefix: PrefixStates | None) -> bool:
        """Whether this chunk's forward can share a forward with other sessions' chunks
        (`scheduler.py`): its rows, spliced with its candidates' prompts, behind nothing or
        behind the shared states of its tokens ahead, its modules changed by row-local
        hooks at most; or a prefix's rows and virtual keys and values, no module changed."""
        delta = session.delta
        if bucket.prefix_ids is not None and prefix is None:  # tokens ahead run per candidate
            return False
        if bucket.virtual:  # a prefix's keys and values: shared attention, segment by segment
            return self.shares_attention(bucket) and not delta.changes_modules
        if delta.changes_modules and not delta.row_local:
            return False
        if group_params is not None and not delta.row_local:
            return False
        return self.backbone.architecture == "causal" or bucket.row_start is None

    @staticmethod
    def merge_path(bucket: Bucket) -> str:
        """Chunks share a forward only along the same path: shared attention over virtual
        keys and values, or the cache path."""
        return "shared" if bucket.virtual else "cache"

    def forward_merged(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """One forward of several mergeable chunks -> each chunk's (p, B, C) verbalizer logits. Rows are
        padded on the right to the widest, the states ahead on the right to the longest,
        both masked there; a causal model gets every row's own positions, so that no real
        position moves. Each chunk's module hooks act on its own rows (segment-wise, as
        S-LoRA and Punica serve many adapters in one batch)."""
        if chunks[0].bucket.virtual:
            return self._forward_merged_shared(chunks)
        causal = self.backbone.architecture == "causal"
        parts = []
        for chunk in chunks:
            session, bucket, group, prefix = chunk.session, chunk.bucket, chunk.group, chunk.prefix
            p = len(group)
            rows = self.rows(bucket, group)
            positions = _positions(bucket, p, rows.shape[1], rows.device)
            past, past_mask = self.past(session.delta, bucket, prefix, None, p) if prefix is not None else ([], None)
            parts.append((rows, bucket.row_mask.repeat(p, 1), positions, past, past_mask))
        width = max(part[0].shape[1] for part in parts)
        ahead = max((part[4].shape[1] for part in parts if part[4] is not None), default=0)
        rows = torch.cat([F.pad(r, (0, 0, 0, width - r.shape[1])) for r, *_ in parts])
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m, *_ in parts])
        kwargs = {}
        if causal:
            kwargs["position_ids"] = torch.cat([F.pad(q, (0, width - q.shape[1])) for _, _, q, *_ in parts])
        if ahead:
            reference = next(part[3] for part in parts if part[3])

            def padded(past, rows: int, layer: int, held: int) -> torch.Tensor:
                """A chunk's keys (held 0) or values (1) of one layer, padded to `ahead`;
                zeros, all masked, for a chunk with nothing ahead."""
                if not past:
                    like = reference[layer][held]
                    return like.new_zeros(rows, like.shape[1], ahead, like.shape[3])
                state = past[layer][held]
                return F.pad(state, (0, 0, 0, ahead - state.shape[2]))

            layers = [tuple(torch.cat([padded(past, len(r), layer, held) for r, _, _, past, _ in parts])
                            for held in (0, 1)) for layer in range(len(reference))]
            past_mask = torch.cat([F.pad(pm, (0, ahead - pm.shape[1])) if pm is not None else
                                   mask.new_zeros(len(r), ahead) for r, _, _, _, pm in parts])
            kwargs["cache"] = DynamicCache(ddp_cache_data=layers, config=self.backbone.model.config)
            mask = torch.cat([past_mask, mask], dim=1)
        with self.running(len(rows), self._tokens(chunks)):
            with segmented(_segments(chunks, [len(part[0]) for part in parts], width)):
                hidden = self.backbone.body(inputs_embeds=rows, attention_mask=mask, **kwargs).last_hidden_state
            logits, first = [], 0
            for chunk, (part, *_) in zip(chunks, parts):
                logits.append(self._read(chunk.session, chunk.bucket, hidden[first:first + len(part)],
                                         len(chunk.group)))
                first += len(part)
        return logits

    def _forward_merged_shared(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """`forward_merged` of prefix chunks: each row segment attends over its own chunk's
        tokens ahead and virtual keys and values (`attention.attending` with segments)."""
        parts, segments, first = [], [], 0
        for chunk in chunks:
            rows = self.rows(chunk.bucket, chunk.group)
            parts.append((rows, _positions(chunk.bucket, len(chunk.group), rows.shape[1], rows.device)))
            segments.append((first, first + len(rows), self._shared_past(chunk.session.delta, chunk.bucket, chunk.prefix,
                                                                         chunk.params, len(chunk.group))))
            first += len(rows)
        width = max(rows.shape[1] for rows, _ in parts)
        rows = torch.cat([F.pad(r, (0, 0, 0, width - r.shape[1])) for r, _ in parts])
        positions = torch.cat([F.pad(q, (0, width - q.shape[1])) for _, q in parts])
        # Padding sits after each row's own tokens, where causal attention never looks back to it.
        with self.running(len(rows), self._tokens(chunks)), attention.attending(self.backbone, segments):
            hidden = self.backbone.body(inputs_embeds=rows, use_cache=False, position_ids=positions).last_hidden_state
            return [self._read(chunk.session, chunk.bucket, hidden[a:b], len(chunk.group))
                    for chunk, (a, b, _) in zip(chunks, segments)]

    def _tokens(self, chunks: list[Chunk]) -> int:
        return sum(len(chunk.group) * self.tokens_per_candidate(chunk.bucket) for chunk in chunks)

    @contextmanager
    def running(self, rows: int, tokens: int) -> Iterator[None]:
        """Around one forward of the model (scoring or generating; under the turn, so one
        at a time): counted, and heard by `on_forward` with its tokens and its time."""
        self.forwards += 1
        self.rows_run += rows
        began = time.perf_counter()
        yield
        if self.on_forward is not None:
            bound = self.bounds.gradient if torch.is_grad_enabled() else self.bounds.inference
            self.on_forward(tokens, bound, time.perf_counter() - began)

    def rows_per_forward(self) -> float:
        return self.rows_run / self.forwards if self.forwards else 0.0

    def _read(self, session: SessionState, bucket: Bucket, hidden: torch.Tensor, p: int) -> torch.Tensor:
        """(p, B, C) verbalizer logits at the rows' read positions."""
        size = len(bucket.indices)
        picked = hidden[torch.arange(p * size, device=hidden.device), bucket.read.repeat(p)]
        return self._verbalizer_logits(session, picked).view(p, size, -1)

    def _shared_past(self, delta: Delta, bucket: Bucket, prefix: PrefixStates | None,
                     group_params: torch.Tensor | None, p: int) -> attention.SharedPast:
        """The tokens ahead (shared states, or run now per candidate) and the candidates'
        virtual keys and values, each kept once."""
        size = len(bucket.indices)
        ahead = mask = None
        if bucket.prefix_ids is not None:
            mask = bucket.prefix_mask.bool()
            if prefix is not None:
                ahead = [(k[None], v[None]) for k, v in prefix]
            else:  # the candidates change the tokens ahead: run them, candidate-major rows
                states, _ = self.past(delta, bucket, None, group_params, p, virtual=False)
                ahead = [(k.view(p, size, *k.shape[1:]), v.view(p, size, *v.shape[1:])) for k, v in states]
        return attention.SharedPast(p, size, ahead, mask, delta.key_values(group_params))

    def past(self, delta: Delta, bucket: Bucket, prefix: PrefixStates | None,
              group_params: torch.Tensor | None, p: int, virtual: bool = True
              ) -> tuple[PrefixStates, torch.Tensor | None]:
        """What the rows of p candidates attend to ahead of themselves, per layer, and its
        mask (p * B, ...): the tokens ahead of the prompt (shared `prefix` states, or run
        now for each candidate under its delta's hooks), then the candidates' virtual
        keys and values. Runs inside `patched`."""
        size = len(bucket.indices)
        past: PrefixStates = []
        masks = []
        if bucket.prefix_ids is not None:
            masks.append(bucket.prefix_mask.repeat(p, 1))
            if prefix is not None:
                past = [(k.repeat(p, 1, 1, 1), v.repeat(p, 1, 1, 1)) for k, v in prefix]
            else:  # the candidates change the tokens ahead: run them, candidate-major rows
                cache = DynamicCache(config=self.backbone.model.config)
                self.backbone.body(input_ids=bucket.prefix_ids.repeat(p, 1), attention_mask=masks[0], cache=cache,
                                   use_cache=True)
                past = [(layer.keys, layer.values) for layer in cache.layers]
        if bucket.virtual and virtual:
            states = [(k.repeat_interleave(size, dim=0), v.repeat_interleave(size, dim=0))
                      for k, v in delta.key_values(group_params)]
            past = [(torch.cat([k, vk], dim=2), torch.cat([v, vv], dim=2)) for (k, v), (vk, vv) in
                    zip(past, states)] if past else states
            masks.append(bucket.row_mask.new_ones(p * size, bucket.virtual))
        return past, torch.cat(masks, dim=1) if masks else None

    def _verbalizer_logits(self, session: SessionState, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, C) logits of the classes: of their words, where a class has several the
        log of the words' probabilities summed (the softmax's shared norm cancels out
        of every loss and score)."""
        head = self.backbone.head
        if isinstance(head, torch.nn.Linear):
            # Only the verbalizer's rows of a plain output matrix: skips a (rows x vocab) matmul.
            weight = head.weight[session.verbalizer_ids]
            bias = head.bias[session.verbalizer_ids] if head.bias is not None else None
            words = F.linear(hidden, weight, bias).float()
        else:
            words = head(hidden)[:, session.verbalizer_ids].float()
        if session.word_classes is None:
            return words
        member = session.word_classes[None, :] == torch.arange(session.num_classes, device=words.device)[:, None]
        return torch.logsumexp(words[:, None, :].masked_fill(~member[None], float("-inf")), dim=-1)


def _positions(bucket: Bucket, p: int, width: int, device) -> torch.Tensor:
    """(p * B, width) positions of a chunk's rows: from the bucket's row starts, else 0."""
    start = bucket.row_start if bucket.row_start is not None else torch.zeros(
        len(bucket.indices), dtype=torch.long, device=device)
    return (start[:, None] + torch.arange(width, device=device)).repeat(p, 1)


def _segments(chunks: list[Chunk], sizes: list[int], width: int) -> list[Segment]:
    """The hooked segments of merged chunks: each chunk's rows with their prompt slots padded to `width`."""
    segments, first = [], 0
    for chunk, size in zip(chunks, sizes):
        if chunk.params is not None and chunk.session.delta.changes_modules:
            row_ids = chunk.bucket.row_ids
            slots = torch.where(row_ids < 0, (-row_ids - 1).clamp(min=0), -1)
            segments.append(Segment(chunk.session.delta, chunk.params,
                                    F.pad(slots, (0, width - slots.shape[1]), value=-1), first, size, chunk.routing))
        first += size
    return segments


@dataclass
class Segment:
    """Rows first .. first + size of a merged forward, under one row-local delta."""

    delta: Delta
    params: torch.Tensor  # (p, D)
    slots: torch.Tensor  # (B, L): the prompt slot of each position, or -1
    first: int
    size: int
    routing: Routing | None = None


@contextmanager
def segmented(segments: list[Segment]) -> Iterator[None]:
    """While entered, the hooks of a forward whose rows belong to several row-local
    deltas: one forward hook (or pre-hook) per hooked module, each running every
    segment's own hook on that segment's rows."""
    hooked: dict[tuple[torch.nn.Module, bool], list[tuple[int, int, Callable]]] = {}
    for segment in segments:
        first, size = segment.first, segment.size
        for pre, hooks in segment.delta.row_hook_sets(segment.params, segment.slots, segment.routing):
            for module, hook in hooks:
                hooked.setdefault((module, pre), []).append((first, first + size, hook))
    post = [(module, _segmented(parts)) for (module, pre), parts in hooked.items() if not pre]
    pre = [(module, _segmented_pre(parts)) for (module, pre), parts in hooked.items() if pre]
    with forward_hooks(post), forward_hooks(pre, pre=True):
        yield


def _segmented(parts: list[tuple[int, int, Callable]]) -> Callable:
    """A forward hook that runs each (first row, end row, hook) on its rows and writes what
    it returns back in place (inference only: the merged path never runs under autograd)."""
    def hook(module, args, output):
        whole = output[0] if isinstance(output, tuple) else output
        for start, end, own in parts:
            own_args = (args[0][start:end], *args[1:]) if args and isinstance(args[0], torch.Tensor) else args
            own_output = (whole[start:end], *output[1:]) if isinstance(output, tuple) else whole[start:end]
            changed = own(module, own_args, own_output)
            if changed is not None:
                whole[start:end] = changed[0] if isinstance(changed, tuple) else changed
        return output
    return hook


def _segmented_pre(parts: list[tuple[int, int, Callable]]) -> Callable:
    """The pre-hook form of `_segmented`: each (first row, end row, pre-hook) changes its
    rows of the hidden states the module gets, written back in place."""
    def hook(module, args, kwargs):
        hidden = hidden_of(args, kwargs)
        for start, end, own in parts:
            own_args, own_kwargs = with_hidden(args, kwargs, hidden[start:end])
            changed = own(module, own_args, own_kwargs)
            if changed is not None:
                hidden[start:end] = hidden_of(*changed)
        return args, kwargs
    return hook


def out_of_memory(error: Exception) -> bool:
    """A device (CUDA) or host allocator running out of memory."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def example_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) logits and (R,) targets -> each row's cross-entropy and multi-class hinge loss."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values
    return ce, (HINGE_MARGIN + others - true).clamp(min=0)
