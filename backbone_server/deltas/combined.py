"""Combinations of delta kinds, UniPELT gates and AdaMix, all selected by the kind string
(the proto's DeltaSpec has no field for them):

* "KIND+KIND[+...]" (e.g. "prompt+lora", "lora+adapter+bias"): a `CombinedDelta`, every
  part a delta of its own kind driven by its own slice of z.
* "unipelt:KIND[+KIND...]": the same with UniPELT's per-layer gates (a CLI `--mix
  unipelt` maps onto this prefix).
* "adamix:KIND" or "adamixM:KIND" (M copies, default 4) with KIND one weight kind
  (lora, adapter, bias): an `AdaMixDelta`. AdaMix is not combined with "+".

Combinations
------------
Part i (its position in the kind string, from 0) gets a DeltaConfig of its own: the
session's projection and projection_scale, seed = seed + i * PART_SEED_STRIDE (so the
first part keeps the session's seed: "prompt+lora" has the plain prompt kind's p0),
prompt_length to the one prompt-like part (prompt or deep-prompt, at most one; the others
get 0), rank to the parts that take one (lora, adapter), targets only when there is
exactly one weight part (lora, adapter, bias); otherwise targets are refused.

z split rule: z = [z_0 | z_1 | ... | z_{k-1} | gates]; the k parts share the
intrinsic_dim minus the gate coordinates (none without unipelt): by the declared
`part_dims` (one size per part, in kind order, summing to that), else EQUALLY, the
remainder going to the first part: part i gets d // k (+ d % k for i = 0), consecutive
slices in kind order. prompts(z) are the prompt-like part's (none without one), parameters(z) the
concatenation of the parts' parameters in kind order (the parts whose parameters are not
None: weight parts and the deep prompt's layer offsets), `patched` enters every such
part's `patched` with its columns, changes_prefix is any part's and num_parameters the
sum of the parts'.

UniPELT gates
-------------
Every gated part gets one gate per transformer layer it acts in: g = sigmoid(GATE_SCALE *
z_gate + GATE_BIAS) with GATE_BIAS = 0, so the gates start at 0.5 at z = 0 (a gradient
through every part stays nonzero there; the gates' own gradient is zero at z = 0 since
every part's update is zero there, as in UniPELT). The gate coordinates are the LAST
coordinates of z, part by part in kind order, layer by layer. The gate of layer l
multiplies the part's effect in that layer, applied to its parameters (so batched per
candidate, one broadcast multiply, no loop over candidates):

* lora: the B block of every target in layer l (the update B A x is linear in B);
* adapter: the W_up block of every adapted module in layer l (the update is linear in it);
* bias: the shift of every module in layer l;
* deep-prompt: the offsets added entering layer l (layers 1 .. L-1: L-1 gates). Its input
  soft prompt (layer 0) and the plain "prompt" kind are not gated (no gates).

A module's layer is read from its name ("layers.<l>." or "layer.<l>."); modules in no
layer (e.g. Llama's final norm for the bias kind) are not gated. Since every part's update
is zero at z = 0 whatever the gate, z = 0 is still exactly the base model (or p0).

AdaMix
------
M copies of one weight part: copy j is the kind built with seed + j * PART_SEED_STRIDE
(its own projection of the whole z) sharing copy 0's fixed start (LoRA's A0, the
adapter's W_d0), so parameters(z) is (P, M * D). On the routed splits (ROUTED_SPLIT,
"train", the search split, and any split whose name ends with ROUTED_SUFFIX, "-routed")
each example goes to one copy drawn from (session seed, the example's index in the
split): deterministic, the same for every candidate and every call. Every other split is
scored with the copies MERGED by averaging their parameters (weights) into one module.
So a client that registers its test examples a second time as "test-routed", and its
training examples as "train-merged", gets both scores of both (the tuner does).

The engine passes `routing` (split name and the examples' indices within the split) to
`patched` of deltas with `routed = True` only. Routed rows get per-row parameters: the
part's `patched` runs with p * B "candidates" of one row each (memory p * B * D per
chunk on the search split; the merged path uses p * D).
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import torch

from backbone_server.deltas.base import DELTA_KINDS, Delta, DeltaConfig, Routing
from backbone_server.errors import InvalidArgument

PART_SEED_STRIDE = 7_000_003
PROMPT_KINDS = ("prompt", "deep-prompt")
WEIGHT_KINDS = ("lora", "adapter", "bias")
RANKED_KINDS = ("lora", "adapter")
GATED_KINDS = ("lora", "adapter", "bias", "deep-prompt")
GATE_SCALE = 1.0
GATE_BIAS = 0.0
ROUTED_SPLIT = "train"
ROUTED_SUFFIX = "-routed"
DEFAULT_COPIES = 4
MAX_COPIES = 64
# How kinds combine into one delta, as GetInfo tells a client (ModelInfo.delta_forms).
DELTA_FORMS = (
    "KIND+KIND[+KIND...]: the parts share z (equal slices, the remainder to the first), at most one prompt kind",
    f"unipelt:KIND[+KIND...]: per-layer gates sigmoid(z_gate) on every part of {', '.join(GATED_KINDS)}",
    f"adamix[M]:KIND: M copies (default {DEFAULT_COPIES}, at most {MAX_COPIES}) of one of {', '.join(WEIGHT_KINDS)}, "
    "routed per example on 'train' and '*-routed' splits, merged by averaging elsewhere",
    "deep-prompt with per_layer_z: one block of intrinsic_dim coordinates of z per layer",
)
ROUTE_SALT = 0xADA
LAYER_NAME = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The transformer layer a module named `name` sits in, or None."""
    match = LAYER_NAME.search(name + ".")
    return int(match.group(1)) if match else None


def build_composite(config: DeltaConfig, backbone) -> Delta:
    """The delta for a kind with "+" or a "unipelt:" / "adamix[M]:" prefix."""
    kind = config.kind
    mix = None
    if ":" in kind:
        mix, kind = kind.split(":", 1)
    if mix is not None and (mix == "adamix" or re.fullmatch(r"adamix\d+", mix)):
        copies = int(mix[len("adamix"):] or DEFAULT_COPIES)
        if not 1 <= copies <= MAX_COPIES:
            raise InvalidArgument(f"adamix needs 1 .. {MAX_COPIES} copies, got {copies}")
        if kind not in WEIGHT_KINDS:
            raise InvalidArgument(f"adamix takes one weight kind ({', '.join(WEIGHT_KINDS)}), got {kind!r}")
        return AdaMixDelta(config, backbone, kind, copies)
    if mix not in (None, "unipelt"):
        raise InvalidArgument(f"unknown mix {mix!r} in delta kind {config.kind!r}; "
                              "known: unipelt:KIND+KIND, adamix:KIND, adamixM:KIND")
    return CombinedDelta(config, backbone, kind.split("+"), gated=mix == "unipelt")


def _check_part(kind: str, whole: str) -> None:
    if kind not in DELTA_KINDS:
        raise InvalidArgument(f"unknown delta kind {kind!r} in {whole!r}; parts can be "
                              f"{', '.join(sorted(DELTA_KINDS))}")


class CombinedDelta(Delta):
    def __init__(self, config: DeltaConfig, backbone, kinds: list[str], gated: bool = False):
        for kind in kinds:
            _check_part(kind, config.kind)
        if len(set(kinds)) != len(kinds):
            raise InvalidArgument(f"delta kind {config.kind!r} repeats a part")
        prompt_parts = [k for k in kinds if k in PROMPT_KINDS]
        weight_parts = [k for k in kinds if k in WEIGHT_KINDS]
        if len(prompt_parts) > 1:
            raise InvalidArgument(f"delta kind {config.kind!r} combines {' and '.join(prompt_parts)}; "
                                  "at most one prompt-like part (prompt or deep-prompt)")
        if config.prompt_length and not prompt_parts:
            raise InvalidArgument(f"delta kind {config.kind!r} has no prompt; prompt_length must be 0")
        if config.targets and len(weight_parts) != 1:
            raise InvalidArgument(f"targets are ambiguous for delta kind {config.kind!r}: they apply only when "
                                  f"exactly one part is a weight kind ({', '.join(WEIGHT_KINDS)}), "
                                  f"it has {len(weight_parts)}")
        if config.rank and not any(k in RANKED_KINDS for k in kinds):
            raise InvalidArgument(f"delta kind {config.kind!r} has no part that takes a rank")
        self.config = config
        self.gated = gated
        self.hidden_size = backbone.hidden_size
        self.dtype = backbone.dtype
        self.num_layers = backbone.num_layers
        gated_kinds = [k for k in kinds if gated and k in GATED_KINDS]
        if gated and not gated_kinds:
            raise InvalidArgument(f"unipelt gates act on {', '.join(GATED_KINDS)}; {config.kind!r} has none")
        self.gate_counts = [(backbone.num_layers - 1 if k == "deep-prompt" else backbone.num_layers)
                            if k in gated_kinds else 0 for k in kinds]
        self.num_gates = sum(self.gate_counts)
        shared = config.intrinsic_dim - self.num_gates
        if config.part_dims:
            if len(config.part_dims) != len(kinds) or sum(config.part_dims) != shared:
                raise InvalidArgument(
                    f"part_dims {list(config.part_dims)} must give each of the {len(kinds)} parts of "
                    f"{config.kind!r} its size, summing to intrinsic_dim {config.intrinsic_dim}"
                    + (f" minus its {self.num_gates} gate coordinates ({shared})" if self.num_gates else ""))
            self.dims = list(config.part_dims)
        elif shared < len(kinds):
            raise InvalidArgument(f"intrinsic_dim {config.intrinsic_dim} is too small for {config.kind!r}: "
                                  f"{self.num_gates} gate coordinates plus at least one per part")
        else:
            self.dims = [shared // len(kinds) + (shared % len(kinds) if i == 0 else 0) for i in range(len(kinds))]
        self.kinds = kinds
        self.parts: list[Delta] = []
        for i, (kind, dim) in enumerate(zip(kinds, self.dims)):
            part_config = DeltaConfig(
                kind,
                prompt_length=config.prompt_length if kind in PROMPT_KINDS else 0,
                intrinsic_dim=dim,
                projection=config.projection,
                seed=config.seed + i * PART_SEED_STRIDE,
                projection_scale=config.projection_scale,
                rank=config.rank if kind in RANKED_KINDS else 0,
                targets=config.targets if kind in WEIGHT_KINDS else (),
            )
            self.parts.append(DELTA_KINDS[kind](part_config, backbone))
        self.prompt_part = next((p for k, p in zip(kinds, self.parts) if k in PROMPT_KINDS), None)
        self.prompt_length = config.prompt_length
        if self.prompt_part is not None:
            self.initial_token_ids = self.prompt_part.initial_token_ids
        self.changes_prefix = any(part.changes_prefix for part in self.parts)
        device = backbone.device
        # Each part's width of parameters(z) (0: None) and its slice of z.
        self.widths = []
        for part, dim in zip(self.parts, self.dims):
            probe = part.parameters(torch.zeros(1, dim, device=device))
            self.widths.append(0 if probe is None else probe.shape[1])
        self.z_starts = np.cumsum([0] + self.dims).tolist()
        # Per gated part, (width,) the gate of each parameter entry (count: ungated, gate 1).
        self.gate_index = [self._gate_index(kind, part, width, count).to(device) if count else None
                           for kind, part, width, count in zip(kinds, self.parts, self.widths, self.gate_counts)]
        self.description = " + ".join(getattr(p, "description", k) for k, p in zip(kinds, self.parts))
        if gated:
            self.description = f"unipelt gates over {self.description}"

    def _gate_index(self, kind: str, part: Delta, width: int, count: int) -> torch.Tensor:
        index = torch.full((width,), count, dtype=torch.long)
        if kind == "deep-prompt":
            block = part.prompt_length * part.hidden_size
            for i in range(count):  # block i holds the offsets entering layer i + 1 (gate i)
                index[i * block:(i + 1) * block] = i
            return index
        for (name, _), entry in zip(part.modules, part.layout):
            layer = layer_of(name)
            if layer is None or layer >= count:
                continue
            if kind == "lora":
                _, offset, fan_in, fan_out = entry
                first, last = offset + part.rank * fan_in, offset + part.rank * (fan_in + fan_out)
            elif kind == "adapter":
                _, offset, w = entry
                first, last = offset + part.size_m * w, offset + 2 * part.size_m * w
            else:  # bias
                _, offset, w = entry
                first, last = offset, offset + w
            index[first:last] = layer
        return index

    def _slice(self, z: torch.Tensor, i: int) -> torch.Tensor:
        return z[:, self.z_starts[i]:self.z_starts[i + 1]]

    def gates(self, z: torch.Tensor) -> torch.Tensor:
        """(P, d) -> (P, num_gates) the candidates' gates (all parts, in order)."""
        return torch.sigmoid(GATE_SCALE * z[:, z.shape[1] - self.num_gates:] + GATE_BIAS)

    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        if self.prompt_part is None:
            return super().prompts(z)
        return self.prompt_part.prompts(self._slice(z, self.parts.index(self.prompt_part)))

    def parameters(self, z: torch.Tensor) -> torch.Tensor | None:
        if not any(self.widths):
            return None
        gates = self.gates(z) if self.num_gates else None
        blocks, first_gate = [], 0
        for i, (part, width, count) in enumerate(zip(self.parts, self.widths, self.gate_counts)):
            if width:
                block = part.parameters(self._slice(z, i))
                if count:
                    g = gates[:, first_gate:first_gate + count]
                    # Entries of layer l times g_l, entries in no gated block times 1.
                    g = torch.cat([g, g.new_ones(g.shape[0], 1)], dim=1)
                    block = block * g[:, self.gate_index[i]]
                blocks.append(block)
            first_gate += count
        return torch.cat(blocks, dim=1)

    @contextlib.contextmanager
    def patched(self, params: torch.Tensor | None, slots: torch.Tensor | None = None):
        with contextlib.ExitStack() as stack:
            first = 0
            for part, width in zip(self.parts, self.widths):
                if width:
                    stack.enter_context(part.patched(params[:, first:first + width], slots))
                    first += width
            yield

    @property
    def num_parameters(self) -> int:
        return sum(part.num_parameters for part in self.parts)

    @property
    def z_blocks(self) -> list[tuple[str, int]]:
        """One block per part, named by its kind, then the gates (if any)."""
        blocks = [(kind, dim) for kind, dim in zip(self.kinds, self.dims)]
        return blocks + ([("gates", self.num_gates)] if self.num_gates else [])


def is_routed(split: str) -> bool:
    """Whether AdaMix routes the examples of `split` to copies (else it merges them)."""
    return split == ROUTED_SPLIT or split.endswith(ROUTED_SUFFIX)


class AdaMixDelta(Delta):
    routed = True

    def __init__(self, config: DeltaConfig, backbone, kind: str, copies: int):
        self.config = config
        self.kind = kind
        self.num_copies = copies
        self.hidden_size = backbone.hidden_size
        self.dtype = backbone.dtype
        self.copies: list[Delta] = []
        for j in range(copies):
            part_config = DeltaConfig(kind, prompt_length=config.prompt_length, intrinsic_dim=config.intrinsic_dim,
                                      projection=config.projection, seed=config.seed + j * PART_SEED_STRIDE,
                                      projection_scale=config.projection_scale, rank=config.rank,
                                      targets=config.targets)
            copy = DELTA_KINDS[kind](part_config, backbone)
            if self.copies and hasattr(copy, "start"):
                copy.start = self.copies[0].start  # one fixed start (A0 / W_d0), M projections
            self.copies.append(copy)
        self.size = self.copies[0].num_parameters
        self.changes_prefix = self.copies[0].changes_prefix
        self.description = f"adamix of {copies} copies of: {getattr(self.copies[0], 'description', kind)}"
        self._routes: dict[int, int] = {}

    @property
    def num_parameters(self) -> int:
        return self.num_copies * self.size

    def parameters(self, z: torch.Tensor) -> torch.Tensor:
        """(P, d) -> (P, M * D): the M copies' parameters side by side."""
        return torch.cat([copy.parameters(z) for copy in self.copies], dim=1)

    def route(self, indices) -> list[int]:
        """The copy of each example (its index within the routed split)."""
        out = []
        for i in (int(i) for i in indices):
            if i not in self._routes:
                rng = np.random.default_rng([int(self.config.seed) % 2**63, ROUTE_SALT, i])
                self._routes[i] = int(rng.integers(self.num_copies))
            out.append(self._routes[i])
        return out

    def patched(self, params: torch.Tensor, slots: torch.Tensor | None = None, routing: Routing | None = None):
        p = params.shape[0]
        copies = params.view(p, self.num_copies, self.size)
        base = self.copies[0]
        if routing is None or not is_routed(routing.split):
            return base.patched(copies.mean(dim=1), slots)
        route = torch.tensor(self.route(routing.indices), device=params.device)  # (B,)
        rows = copies[:, route]  # (p, B, D): each row's candidate's copy
        return base.patched(rows.reshape(p * len(route), self.size), slots)
