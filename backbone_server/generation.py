"""Text generation under a tuned delta (causal models), with a KV cache.

The input of a text is what the engine scores: the session's template filled in with the
text and the prompt and cut at {mask}, where the tuned model reads its verbalizer
(`TemplateEncoder.encode`: tokens ahead of the prompt, the prompt slot, the tokens after,
the read position, which in a causal model is the input's last token). Generation goes
on from exactly there: one forward of the input, then one forward of one token per new
token, each attending to the cache of everything before it.

The input runs as `scoring.Scorer.forward_chunk` runs one candidate (p = 1, the texts as
its B rows), so that the first new token's logits are the engine's at {mask}:

- prompt vectors ("prompt", a deep prompt's input, a combination's prompt part) are
  spliced into the input embeddings at the prompt slot (`delta.prompts`);
- module parameters (weight kinds, a deep prompt's offsets) act through
  `delta.patched(params, slots, routing)` around every forward, the input's and each new
  token's, entered and left per forward (no hook outlives its forward; routing None:
  AdaMix merges its copies, as on any split it does not route);
- a deep prompt adds its offsets at the positions `slots` marks as the prompt's. Only the
  input holds those positions: their states enter the cache as every token's do, and a
  new token, never a prompt position, gets slots -1 and so no offset. That is what a full
  recompute of the longer text gives, so the cached result is exact;
- the prefix kind (`kv_prompt`) has no prompt slot in its rows: the tokens ahead of
  {prompt} run first (right-padded, positions from 0), the candidate's n virtual keys and
  values are appended to every layer's cache behind them (the engine's prefix path,
  `Scorer._past`), then the tokens after {prompt} run at the positions they would have
  with n real tokens in between, and each new token goes on from there.

Batching: the texts are the rows of one batch, left-padded (with a prefix: the tokens
ahead right-padded as the engine pads them, those behind left-padded), so that every
row's read position is the input's last column and new tokens go on at the end of every
row; explicit positions and the attention mask leave the padding out, so each text gets
what it gets alone (to the last bits of a float). A row that has finished is fed padding
until every row has.

`Generation.steps()` runs one forward per step and holds no hook, grad mode or lock
between steps, so a caller (the engine) can give each step a turn of its own and stop
between steps when its caller goes away; `generate` runs them all. The steps one by one
are `start`, then `take` and `decode` until `take` answers None.

Inputs and token steps of several generations (other requests, other deltas) share one
forward: `start_together` runs their inputs left-padded to the widest (the rows path; a
prefix starts alone), `decode_together` their new tokens, their caches stacked into one
joint cache, each padded ahead to the longest and masked there, kept while the same
generations step together; each generation's hooks (`Delta.row_hook_sets`) act on its
own rows. Those are the engine's `StartStep` and `DecodeStep` (`scheduler.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from backbone_server.batching import Bucket, PrefixStates
from backbone_server.deltas import Delta
from backbone_server.deltas.budget import SEED_MODULUS, derived_seed
from backbone_server.encoding import EncodedExample, TemplateEncoder
from backbone_server.errors import InvalidArgument, ResourceExhausted
from backbone_server.models import Backbone
from backbone_server.scoring import Scorer, Segment, TokenBounds, out_of_memory, segmented

MAX_NEW_TOKENS = 1024
MAX_TEXTS = 256  # rows of one batch
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
FINISH_REASONS = ("eos", "length", "stop")


@dataclass
class GenerationResult:
    """One text's continuation: `text` decoded (a stop string and what follows cut off),
    `tokens` the ids generated (without the EOS; for "stop" up to the token that completed
    the stop string), `finish_reason` "eos", "length" (max_new_tokens) or "stop"."""

    text: str
    tokens: list[int]
    finish_reason: str


def generate(backbone: Backbone, delta: Delta, encoder: TemplateEncoder, z: np.ndarray | None,
             texts: list[tuple[str, str]], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             stop: Sequence[str] = ()) -> list[GenerationResult]:
    """Each (text_a, text_b) of `texts` continued from {mask} under the delta at `z` ((d,)
    float32; None: zeros), in one batch: greedy at temperature 0, else sampled from
    softmax(logits / temperature), text i with a generator seeded by seed + i."""
    generation = Generation(backbone, delta, encoder, z, texts, max_new_tokens, temperature, seed, stop)
    for _ in generation.steps():
        pass
    return generation.results


class Generation:
    """One batch of texts generated step by step: `steps()` runs one forward per step (the
    input first, then one token) and yields that step's (B, vocabulary) float32 logits;
    once it is exhausted, `results` holds every text's `GenerationResult`. Everything a
    request can get wrong is refused here, before any forward."""

    def __init__(self, backbone: Backbone, delta: Delta, encoder: TemplateEncoder, z: np.ndarray | None,
                 texts: list[tuple[str, str]], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 stop: Sequence[str] = ()):
        if backbone.architecture != "causal":
            raise InvalidArgument(f"Generate needs a causal model (one that continues a text, such as Llama or "
                                  f"GPT-2); {backbone.name} is a {backbone.architecture} LM, which fills in masked "
                                  "tokens instead")
        if encoder.prompt_length != delta.prompt_length:
            raise ValueError(f"the encoder makes room for {encoder.prompt_length} prompt vectors, the delta has "
                             f"{delta.prompt_length}: pass the session's own encoder and delta")
        self.backbone = backbone
        self.delta = delta
        self.max_new_tokens = _check_max_new_tokens(max_new_tokens)
        self.temperature = _check_temperature(temperature)
        self.stop = _check_stop(stop)
        self.z = _check_z(z, delta.z_dim)
        self.examples = self._encode(encoder, texts)
        seed = _check_seed(seed)
        tokenizer = backbone.tokenizer
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.eos_ids = _eos_ids(backbone)
        size = len(self.examples)
        self.generators = None
        if self.temperature > 0:
            self.generators = [torch.Generator(device=backbone.device).manual_seed(derived_seed(seed, i))
                               for i in range(size)]
        self.tokens: list[list[int]] = [[] for _ in range(size)]
        self.texts: list[str | None] = [None] * size  # a row's text once a stop string cut it
        self.finished: list[str | None] = [None] * size
        self.results: list[GenerationResult] | None = None
        # The cache and what goes with it, from the input's forward on.
        self.params: torch.Tensor | None = None
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, cached + new) attention mask
        self.next_position: torch.Tensor | None = None  # (B,) the position of each row's next token
        self.steps_taken = 0  # tokens chosen so far, per row (EOS and padding counted)
        self._joint: _JointCache | None = None  # set while its cache lives in a merged step's
        self._started = False

    # ---- the request ------------------------------------------------------------------

    def _encode(self, encoder: TemplateEncoder, texts) -> list[EncodedExample]:
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise InvalidArgument("texts must be a list of (text_a, text_b) pairs")
        if not 1 <= len(texts) <= MAX_TEXTS:
            raise InvalidArgument(f"Generate takes 1 .. {MAX_TEXTS} texts at a time, got {len(texts)}")
        n = self.delta.prompt_length
        limit = self.backbone.max_length
        examples = []
        for index, pair in enumerate(texts):
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2 or not all(
                    text is None or isinstance(text, str) for text in pair):
                raise InvalidArgument(f"text {index}: expected a (text_a, text_b) pair of strings")
            example = encoder.encode(pair[0], pair[1] or "", 0, False, index)
            length = example.length(n)
            assert example.read == length - 1, "a causal model reads at the input's last token"
            if length + self.max_new_tokens > limit:
                raise InvalidArgument(
                    f"text {index} takes {length} tokens with the prompt; with max_new_tokens "
                    f"{self.max_new_tokens} that is {length + self.max_new_tokens}, more than the model's "
                    f"max_length of {limit}: ask for at most {max(limit - length, 0)} new tokens or shorten it")
            if self.delta.kv_prompt and not example.after:
                raise InvalidArgument(
                    f"text {index}: the template has no token between {{prompt}} and {{mask}}; a prefix's virtual "
                    "tokens have no output of their own to continue from")
            examples.append(example)
        return examples

    # ---- the steps ----------------------------------------------------------------------

    def steps(self) -> Iterator[torch.Tensor]:
        """Runs the input, then one token per step, until every text has finished; yields
        each step's (B, vocabulary) float32 logits (rows of finished texts are noise)."""
        logits = self.start()
        while True:
            chosen = self.take(logits)
            yield logits
            if chosen is None:
                return
            logits = self.decode(chosen)

    def start(self) -> torch.Tensor:
        """The input's forward: (B, vocabulary) logits of every text's first new token."""
        if self._started:
            raise RuntimeError("a Generation runs once")
        self._started = True
        return self._run(self._input_forward)

    def decode(self, chosen: torch.Tensor) -> torch.Tensor:
        """One forward of the (B,) tokens `take` chose, behind the cache: the next logits."""
        return self._run(lambda: self._token_forward(chosen))

    @property
    def cached_length(self) -> int:
        """The tokens every row's cache holds (padding included): the mask's width."""
        return self.mask.shape[1]

    @property
    def input_width(self) -> int:
        """The tokens of its input's widest row (the prompt's slots counted)."""
        n = self.delta.prompt_length
        return max(e.length(n) for e in self.examples)

    @property
    def mergeable(self) -> bool:
        """Whether its token steps can share a forward with other generations'
        (`decode_together`): its delta changes nothing a new token goes through, or only
        through row-local hooks; the model's cache is one plain growing tensor per layer."""
        delta = self.delta
        return (not delta.changes_modules or delta.row_local) and _plain_cache(self.backbone)

    @property
    def starts_mergeable(self) -> bool:
        """Whether its input's forward can share one with other generations'
        (`start_together`): as its token steps, on the rows path (no prefix's virtual keys
        and values, whose tokens ahead run first)."""
        return not self.delta.kv_prompt and self.mergeable

    def _run(self, forward) -> torch.Tensor:
        try:
            with torch.inference_mode():
                return forward()
        except Exception as error:
            if not out_of_memory(error):
                raise
            if self.backbone.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ResourceExhausted(f"generating {len(self.examples)} texts of up to {self.max_new_tokens} new "
                                    "tokens does not fit in device memory; generate fewer texts at a time or "
                                    "fewer new tokens") from None

    def _input_forward(self) -> torch.Tensor:
        if self.delta.kv_prompt:
            self.params = self.delta.parameters(torch.tensor(self.z[None], device=self.backbone.device))
            hidden = self._prefix_input()
        else:
            hidden = self._rows_input()
        return self._logits(hidden[:, -1])

    def _rows_input(self) -> torch.Tensor:
        """Before + prompt + after of every text in one left-padded forward: the prompt's
        vectors spliced in at its slot, the delta's modules patched, the slot positions
        given to `patched` (as `Scorer.forward_chunk` does)."""
        rows = self._input_rows()
        self.params, self.mask = rows.params, rows.mask
        self.cache = DynamicCache(config=self.backbone.model.config)
        self.next_position = rows.positions[:, -1] + 1
        with self.delta.patched(self.params, rows.slots, None):
            return self._body(rows.embeddings, rows.positions)

    def _input_rows(self) -> "_InputRows":
        """Its input's rows, left-padded (the rows path: no prefix), changing nothing yet."""
        backbone, n = self.backbone, self.delta.prompt_length
        z = torch.tensor(self.z[None], device=backbone.device)
        rows = [list(e.before) + list(range(-1, -n - 1, -1)) + list(e.after) for e in self.examples]
        ids, mask = self._pad(rows, left=True)  # prompt slot i as -(i + 1)
        slot = ids < 0
        slot_index = (-ids - 1).clamp(min=0)
        embeddings = backbone.embeddings(ids.clamp(min=0))
        if n:
            embeddings = torch.where(slot[:, :, None], self.delta.prompts(z)[0][slot_index], embeddings)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return _InputRows(embeddings, mask, positions, torch.where(slot, slot_index, -1), self.delta.parameters(z))

    def _prefix_input(self) -> torch.Tensor:
        """The prefix path: the tokens ahead of {prompt} (right-padded) and the virtual keys
        and values behind them (`_past_states`), then the tokens after {prompt}
        (left-padded) at the positions after the n virtual ones."""
        backbone, n = self.backbone, self.delta.prompt_length
        befores = [list(e.before) for e in self.examples]
        prefix_ids = prefix_mask = None
        if any(befores):
            prefix_ids, prefix_mask = self._pad(befores, left=False)
        after_ids, after_mask = self._pad([list(e.after) for e in self.examples], left=True)
        device = backbone.device
        size, width = after_ids.shape
        starts = torch.tensor([len(before) + n for before in befores], device=device)
        bucket = Bucket(indices=list(range(size)), index=torch.arange(size, device=device), reuse=False,
                        prefix_ids=prefix_ids, prefix_mask=prefix_mask, row_ids=after_ids, row_mask=after_mask,
                        read=torch.full((size,), width - 1, device=device), row_start=starts, virtual=n)
        ahead = prefix_ids if prefix_ids is not None else after_ids
        with self.delta.patched(self.params, _no_slots(ahead), None):
            past, past_mask = _past_states(backbone, self.delta, bucket, self.params)
        positions = starts[:, None] + (after_mask.cumsum(dim=1) - 1).clamp(min=0)
        self.cache = DynamicCache(ddp_cache_data=past, config=backbone.model.config)
        self.mask = torch.cat([past_mask, after_mask], dim=1)
        self.next_position = positions[:, -1] + 1
        with self.delta.patched(self.params, _no_slots(after_ids), None):
            return self._body(backbone.embeddings(after_ids), positions)

    def _token_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,), behind the cache; no row holds a prompt position."""
        ids = tokens[:, None]
        self.cache = self._own_cache()
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(ids), 1)], dim=1)
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        with self.delta.patched(self.params, _no_slots(ids), None):
            hidden = self._body(self.backbone.embeddings(ids), positions)
        return self._logits(hidden[:, -1])

    def _own_cache(self) -> DynamicCache:
        """Its cache, taken out of a merged step's joint cache if it was last in one."""
        if self._joint is None:
            return self.cache
        cache = DynamicCache(ddp_cache_data=self._cache_layers(), config=self.backbone.model.config)
        self._joint = None
        return cache

    def _cache_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer its rows' (B, kv heads, cached_length, head dim) keys and values."""
        if self._joint is None:
            return [(layer.keys, layer.values) for layer in self.cache.layers]
        first, end = self._joint.rows[self]
        ahead = self._joint.cache.layers[0].keys.shape[2] - self.cached_length
        return [(layer.keys[first:end, :, ahead:], layer.values[first:end, :, ahead:])
                for layer in self._joint.cache.layers]

    def _body(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.backbone.body(inputs_embeds=embeddings, attention_mask=self.mask, position_ids=positions,
                                  cache=self.cache, use_cache=True).last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.head(hidden).float()

    def _pad(self, sequences: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and attention mask, the padding ahead of each row (`left`) or behind it."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if sequence:
                where = slice(width - len(sequence), width) if left else slice(0, len(sequence))
                ids[row, where] = torch.tensor(sequence, dtype=torch.long)
                mask[row, where] = 1
        return ids.to(self.backbone.device), mask.to(self.backbone.device)

    # ---- choosing tokens and finishing ----------------------------------------------------

    def take(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Each unfinished row's next token, recorded; (B,) the tokens the next forward
        runs (padding for rows that have finished), or None once every text has finished
        (`results` then holds them)."""
        with torch.inference_mode():
            chosen = self._choose(logits)
        picked = chosen.tolist()
        for row, token in enumerate(picked):
            if self.finished[row]:
                picked[row] = self.pad_id
                continue
            if token in self.eos_ids:
                self.finished[row] = "eos"
                picked[row] = self.pad_id
                continue
            self.tokens[row].append(token)
            if self.stop and self._stopped(row):
                self.finished[row] = "stop"
        self.steps_taken += 1
        if self.steps_taken >= self.max_new_tokens:
            self.finished = [reason or "length" for reason in self.finished]
        if all(self.finished):
            self.results = [GenerationResult(self.texts[i] if self.texts[i] is not None else self._decode(i),
                                             list(self.tokens[i]), self.finished[i]) for i in range(len(self.tokens))]
            self.cache = self._joint = None  # its memory goes back now
            return None
        return torch.tensor(picked, dtype=torch.long, device=self.backbone.device)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        if self.generators is None:
            return greedy
        # The largest logit first subtracted: a tiny temperature cannot overflow to inf - inf.
        probabilities = ((logits - logits.max(dim=-1, keepdim=True).values) / self.temperature).softmax(dim=-1)
        rows = [torch.multinomial(probabilities[row], 1, generator=self.generators[row])
                if not self.finished[row] else greedy[row:row + 1] for row in range(len(logits))]
        return torch.cat(rows)

    def _stopped(self, row: int) -> bool:
        """Whether the row's text holds a stop string; if so its text is cut before the first."""
        text = self._decode(row)
        found = [at for at in (text.find(s) for s in self.stop) if at >= 0]
        if not found:
            return False
        self.texts[row] = text[:min(found)]
        return True

    def _decode(self, row: int) -> str:
        return self.backbone.tokenizer.decode(self.tokens[row])


@dataclass
class _InputRows:
    embeddings: torch.Tensor  # (B, W, h), the prompt spliced in
    mask: torch.Tensor  # (B, W)
    positions: torch.Tensor  # (B, W)
    slots: torch.Tensor  # (B, W): the prompt slot of each position, or -1
    params: torch.Tensor | None  # (1, D)


def _plain_cache(backbone: Backbone) -> bool:
    """Whether the model's cache is one plain growing tensor per layer (no sliding window)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=backbone.model.config).layers)


def start_together(generations: list[Generation]) -> list[torch.Tensor]:
    """`Generation.start` of several generations whose starts merge, in one forward:
    every generation's rows left-padded to the widest, its hooks on its own rows -> each
    one's (B_i, vocabulary) logits. Their caches come out as one joint cache, from which
    their token steps go on together. A forward that fails changes no generation."""
    if any(g._started for g in generations):
        raise RuntimeError("a Generation runs once")
    backbone = generations[0].backbone
    inputs = [g._input_rows() for g in generations]
    width = max(rows.mask.shape[1] for rows in inputs)

    def ahead(tensor: torch.Tensor, value=0) -> torch.Tensor:  # left-padded to `width` along dim 1
        pad = width - tensor.shape[1]
        return F.pad(tensor, (0, 0, pad, 0) if tensor.dim() == 3 else (pad, 0), value=value)

    rows = _row_ranges(generations)
    segments = [Segment(g.delta, own.params, ahead(own.slots, -1), first, end - first)
                for g, own, (first, end) in zip(generations, inputs, rows.values())
                if own.params is not None and g.delta.changes_modules]
    cache = DynamicCache(config=backbone.model.config)
    with torch.inference_mode():
        positions = torch.cat([ahead(own.positions) for own in inputs])
        with segmented(segments):
            hidden = backbone.body(inputs_embeds=torch.cat([ahead(own.embeddings) for own in inputs]),
                                   attention_mask=torch.cat([ahead(own.mask) for own in inputs]),
                                   position_ids=positions, cache=cache, use_cache=True).last_hidden_state
        logits = backbone.head(hidden[:, -1]).float()
    joint = _JointCache(cache, tuple(generations), rows)
    for g, own in zip(generations, inputs):
        g._started = True
        g.params, g.mask, g.next_position = own.params, own.mask, own.positions[:, -1] + 1
        g.cache, g._joint = None, joint
    return [logits[first:end] for first, end in (rows[g] for g in generations)]


@dataclass(eq=False)
class _JointCache:
    """The cache of a merged token step: its generations' rows stacked, each row's keys
    and values padded ahead to the longest. The generations of the next step, if they are
    the same in the same order, go on from it without a copy."""

    cache: DynamicCache
    members: tuple["Generation", ...]
    rows: dict["Generation", tuple[int, int]]


def decode_together(generations: list[Generation], chosen: list[torch.Tensor]) -> list[torch.Tensor]:
    """`Generation.decode` of several mergeable generations in one forward: each one's
    (B_i,) tokens -> its (B_i, vocabulary) logits, what it gets alone (within float
    rounding). Every row gets its own positions and, through the attention mask, only its
    own cache; a weight kind's hooks act on its generation's rows only. A forward that
    fails leaves every generation as it was, ready to run alone."""
    backbone = generations[0].backbone
    joint = generations[0]._joint
    if joint is None or joint.members != tuple(generations) or any(g._joint is not joint for g in generations):
        joint = _join(generations)
    longest = max(g.cached_length for g in generations)
    with torch.inference_mode():
        ids = torch.cat(chosen)[:, None]
        positions = torch.cat([g.next_position for g in generations])[:, None]
        masks = [torch.cat([g.mask, g.mask.new_ones(len(g.mask), 1)], dim=1) for g in generations]
        mask = torch.cat([F.pad(own, (longest + 1 - own.shape[1], 0)) for own in masks])
        segments = [Segment(g.delta, g.params, torch.full((end - first, 1), -1, device=ids.device), first, end - first)
                    for g, (first, end) in ((g, joint.rows[g]) for g in generations)
                    if g.params is not None and g.delta.changes_modules]
        held = [(layer.keys, layer.values) for layer in joint.cache.layers]
        try:
            with segmented(segments):
                hidden = backbone.body(inputs_embeds=backbone.embeddings(ids), attention_mask=mask,
                                       position_ids=positions, cache=joint.cache, use_cache=True).last_hidden_state
            logits = backbone.head(hidden[:, -1]).float()
        except BaseException:
            for layer, (keys, values) in zip(joint.cache.layers, held):  # a layer's update replaces, never writes in
                layer.keys, layer.values = keys, values
            raise
    for g, own in zip(generations, masks):
        g.mask, g.next_position = own, g.next_position + 1
        g.cache, g._joint = None, joint
    return [logits[first:end] for first, end in (joint.rows[g] for g in generations)]


def _join(generations: list[Generation]) -> _JointCache:
    """A joint cache of the generations' caches: rows stacked in their order, each padded
    ahead (masked there) to the longest."""
    longest = max(g.cached_length for g in generations)
    layers = [g._cache_layers() for g in generations]
    data = []
    for layer in range(len(layers[0])):
        data.append(tuple(torch.cat([F.pad(own[layer][held], (0, 0, longest - own[layer][held].shape[2], 0))
                                     for own in layers]) for held in (0, 1)))
    return _JointCache(DynamicCache(ddp_cache_data=data, config=generations[0].backbone.model.config),
                       tuple(generations), _row_ranges(generations))


def _row_ranges(generations: list[Generation]) -> dict[Generation, tuple[int, int]]:
    """Each generation's (first, end) rows when their texts are stacked in this order."""
    ranges, first = {}, 0
    for g in generations:
        ranges[g] = (first, first + len(g.examples))
        first += len(g.examples)
    return ranges


def _past_states(backbone: Backbone, delta: Delta, bucket: Bucket, params: torch.Tensor | None
                 ) -> tuple[PrefixStates, torch.Tensor]:
    """The engine's prefix path for one candidate (`Scorer.past`): the states of the
    bucket's tokens ahead (run now, under the delta's hooks, which the caller enters) and
    the candidate's virtual keys and values behind them, per layer, with their mask."""
    return Scorer(backbone, TokenBounds(0, 0)).past(delta, bucket, None, params, 1)


def _no_slots(ids: torch.Tensor) -> torch.Tensor:
    """`patched`'s slots for rows without a prompt position: -1 everywhere."""
    return torch.full_like(ids, -1)


def _eos_ids(backbone: Backbone) -> set[int]:
    """The ids that end a text: the tokenizer's EOS and the model's generation config's."""
    ids: set[int] = set()
    generation_config = getattr(backbone.model, "generation_config", None)
    for source in (backbone.tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return {int(i) for i in ids}


def _is_whole(value) -> bool:
    try:
        return not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        return False


def _check_max_new_tokens(value) -> int:
    if not _is_whole(value) or not 1 <= int(value) <= MAX_NEW_TOKENS:
        raise InvalidArgument(f"max_new_tokens must be an integer 1 .. {MAX_NEW_TOKENS}, got {str(value)[:60]}")
    return int(value)


def _check_temperature(value) -> float:
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"temperature must be a number, got {str(value)[:60]!r}") from None
    if isinstance(value, bool) or not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"temperature must be finite and >= 0 (0: greedy), got {str(value)[:60]}")
    return temperature


def _check_seed(value) -> int:
    if not _is_whole(value) or not 0 <= int(value) < SEED_MODULUS:
        raise InvalidArgument(f"seed must be an integer 0 .. 2**64 - 1, got {str(value)[:60]}")
    return int(value)


def _check_stop(stop) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop or ())
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS}")
    for text in stop:
        if not isinstance(text, str) or not text or len(text) > MAX_STOP_CHARS:
            raise InvalidArgument(f"each stop string must be a non-empty string of at most {MAX_STOP_CHARS} "
                                  f"characters, got {str(text)[:60]!r}")
    return stop


def _check_z(z, dim: int) -> np.ndarray:
    if z is None:
        return np.zeros(dim, np.float32)
    try:
        z = np.asarray(z, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidArgument(f"z must be {dim} numbers") from None
    if z.ndim == 2 and z.shape[0] == 1:
        z = z[0]
    if z.shape != (dim,):
        raise InvalidArgument(f"z must have shape ({dim},) (the session's z_dim), got {tuple(z.shape)}")
    if not np.isfinite(z).all():
        raise InvalidArgument(f"z holds a non-finite value (first at coordinate {int(np.argmax(~np.isfinite(z)))})")
    return np.ascontiguousarray(z)
