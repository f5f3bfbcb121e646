"""Combinations of delta kinds ("prompt+lora", "lora+adapter+bias") and UniPELT's gates
over them ("unipelt:lora+adapter"): a `CombinedDelta`, every part a delta of its own kind
driven by its own slice of z. Everything here reads the parts' capabilities and layouts;
nothing names a kind.

Parts
-----
Part i (its position in the delta's form, from 0) gets a DeltaConfig of its own: the
session's projection and projection_scale, seed = seed + i * PART_SEED_STRIDE (so the
first part keeps the session's seed: "prompt+lora" has the plain prompt kind's p0),
prompt_length to the one part that takes a prompt (at most one; the others get 0), rank
to the parts that take one, targets only when exactly one part takes targets; otherwise
targets are refused.

z split rule: z = [z_0 | z_1 | ... | z_{k-1} | gates]; the k parts share the
intrinsic_dim minus the gate coordinates (none without unipelt): by the declared
`part_dims` (one size per part, in kind order, summing to that), else EQUALLY, the
remainder going to the first part: part i gets d // k (+ d % k for i = 0), consecutive
slices in kind order. prompts(z) are the prompt part's (none without one), parameters(z)
the concatenation of the parts' parameters in kind order (the parts that have any), so
the layout is the parts' layouts one after another; `patched` enters every such part's
`patched` with its columns, changes_prefix is any part's and num_parameters the sum of
the parts'.

UniPELT gates
-------------
A part whose kind has `gated_roles` gets one gate per layer of its `gate_layers`: g =
sigmoid(GATE_SCALE * z_gate + GATE_BIAS) with GATE_BIAS = 0, so the gates start at 0.5
at z = 0 (a gradient through every part stays nonzero there; the gates' own gradient is
zero at z = 0 since every part's update is zero there, as in UniPELT). The gate
coordinates are the LAST coordinates of z, part by part in kind order, layer by layer.
The gate of layer l multiplies the part's segments of a gated role in layer l (LoRA's B,
the adapter's W_up, the bias shifts, the deep prompt's offsets: each update is linear in
them), so batched per candidate, one broadcast multiply, no loop over candidates.
Segments in no layer (e.g. Llama's final norm for the bias kind) are not gated. Since
every part's update is zero at z = 0 whatever the gate, z = 0 is still exactly the base
model (or p0).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from backbone_server.deltas.base import DELTA_KINDS, Delta, DeltaConfig, exportable_kinds, kind_class
from backbone_server.deltas.budget import derived_seed
from backbone_server.deltas.exported import Exported, ExportRequest
from backbone_server.deltas.layout import Layout
from backbone_server.errors import InvalidArgument, shown

PART_SEED_STRIDE = 7_000_003
GATE_SCALE = 1.0
GATE_BIAS = 0.0


class CombinedDelta(Delta):
    def __init__(self, config: DeltaConfig, backbone, kinds: tuple[str, ...], gated: bool = False):
        classes = [kind_class(kind, config.kind) for kind in kinds]
        self._check_parts(config, kinds, classes, gated)
        self._bind(config, backbone)
        self.kinds = list(kinds)
        self.gated = gated
        self.num_layers = backbone.num_layers
        self.gate_counts = [len(cls.gate_layers(backbone.num_layers)) if gated else 0 for cls in classes]
        self.num_gates = sum(self.gate_counts)
        self.dims = self._part_dims(config, len(kinds))
        self.parts: list[Delta] = [
            cls(DeltaConfig(
                kind,
                prompt_length=config.prompt_length if cls.takes_prompt else 0,
                init_text=config.init_text if cls.takes_prompt else "",
                intrinsic_dim=dim,
                projection=config.projection,
                seed=derived_seed(config.seed, i * PART_SEED_STRIDE),
                projection_scale=config.projection_scale,
                rank=config.rank if cls.rank_name else 0,
                targets=config.targets if cls.takes_targets else (),
            ), backbone)
            for i, (kind, cls, dim) in enumerate(zip(kinds, classes, self.dims))
        ]
        self.prompt_part = next((part for part in self.parts if part.takes_prompt), None)
        if self.prompt_part is not None:
            self.initial_token_ids = self.prompt_part.initial_token_ids
        self.changes_prefix = any(part.changes_prefix for part in self.parts)
        self.kv_prompt = any(part.kv_prompt for part in self.parts)
        self.layout = Layout.concat(part.layout for part in self.parts)
        self.z_starts = np.cumsum([0] + self.dims).tolist()
        # Per gated part, (width,) the gate of each parameter entry (count: ungated, gate 1).
        self.gate_index = [self._gate_index(part, count).to(backbone.device) if count else None
                           for part, count in zip(self.parts, self.gate_counts)]
        self.description = " + ".join(part.description or kind for kind, part in zip(kinds, self.parts))
        if gated:
            self.description = f"unipelt gates over {self.description}"

    @staticmethod
    def _check_parts(config: DeltaConfig, kinds: tuple[str, ...], classes: list[type[Delta]], gated: bool) -> None:
        if len(set(kinds)) != len(kinds):
            raise InvalidArgument(f"delta kind {config.kind!r} repeats a part")
        prompt_parts = [kind for kind, cls in zip(kinds, classes) if cls.takes_prompt]
        if len(prompt_parts) > 1:
            raise InvalidArgument(f"delta kind {config.kind!r} combines {' and '.join(prompt_parts)}; "
                                  "at most one prompt-like part (a kind that takes a prompt)")
        if (config.prompt_length or config.init_text) and not prompt_parts:
            raise InvalidArgument(f"delta kind {config.kind!r} has no prompt; prompt_length must be 0 and "
                                  "init_text empty")
        targeted = [cls for cls in classes if cls.takes_targets]
        if config.targets and len(targeted) != 1:
            raise InvalidArgument(f"targets are ambiguous for delta kind {config.kind!r}: they apply only when "
                                  f"exactly one part takes targets ({', '.join(_kinds_with('takes_targets'))}), "
                                  f"it has {len(targeted)}")
        if config.rank and not any(cls.rank_name for cls in classes):
            raise InvalidArgument(f"delta kind {config.kind!r} has no part that takes a rank")
        if gated and not any(cls.gated_roles for cls in classes):
            raise InvalidArgument(f"unipelt gates act on {', '.join(_kinds_with('gated_roles'))}; "
                                  f"{config.kind!r} has none")

    def _part_dims(self, config: DeltaConfig, parts: int) -> list[int]:
        shared = config.intrinsic_dim - self.num_gates
        if config.part_dims:
            if len(config.part_dims) != parts or sum(config.part_dims) != shared:
                raise InvalidArgument(
                    f"part_dims {shown(config.part_dims)} must give each of the {parts} parts of "
                    f"{config.kind!r} its size, summing to intrinsic_dim {config.intrinsic_dim}"
                    + (f" minus its {self.num_gates} gate coordinates ({shared})" if self.num_gates else ""))
            return list(config.part_dims)
        if shared < parts:
            raise InvalidArgument(f"intrinsic_dim {config.intrinsic_dim} is too small for {config.kind!r}: "
                                  f"{self.num_gates} gate coordinates plus at least one per part")
        return [shared // parts + (shared % parts if i == 0 else 0) for i in range(parts)]

    def _gate_index(self, part: Delta, count: int) -> torch.Tensor:
        """(width,) the gate of each of the part's parameters: its layer's position among
        the kind's gate layers for a segment of a gated role, else `count` (gate 1)."""
        layers = list(type(part).gate_layers(self.num_layers))
        index = torch.full((part.layout.size,), count, dtype=torch.long)
        for segment in part.layout:
            if segment.role in part.gated_roles and segment.layer in layers:
                index[segment.start:segment.stop] = layers.index(segment.layer)
        return index

    @property
    def widths(self) -> list[int]:
        """Each part's share of the parameter vector (0: it changes no module)."""
        return [part.layout.size for part in self.parts]

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
        if not self.layout.size:
            return None
        gates = self.gates(z) if self.num_gates else None
        blocks, first_gate = [], 0
        for i, (part, count) in enumerate(zip(self.parts, self.gate_counts)):
            if part.layout.size:
                block = part.parameters(self._slice(z, i))
                if count:
                    g = gates[:, first_gate:first_gate + count]
                    # Entries of layer l times g_l, entries in no gated block times 1.
                    g = torch.cat([g, g.new_ones(g.shape[0], 1)], dim=1)
                    block = block * g[:, self.gate_index[i]]
                blocks.append(block)
            first_gate += count
        return torch.cat(blocks, dim=1)

    def key_values(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        first = 0
        for part in self.parts:
            if part.kv_prompt:
                return part.key_values(params[:, first:first + part.layout.size])
            first += part.layout.size
        return super().key_values(params)

    @property
    def _hooked_parts(self) -> list[tuple[Delta, int]]:
        """The parts that change modules, each with where its parameters start."""
        hooked, first = [], 0
        for part in self.parts:
            if part.layout.size and part.changes_modules:
                hooked.append((part, first))
            first += part.layout.size
        return hooked

    @property
    def row_local(self) -> bool:
        """Row-local when every part that changes modules is."""
        return all(part.row_local for part, _ in self._hooked_parts)

    def row_hook_sets(self, params: torch.Tensor, slots: torch.Tensor | None = None, routing=None) -> list:
        sets = []
        for part, first in self._hooked_parts:
            sets += part.row_hook_sets(params[:, first:first + part.layout.size], slots, routing)
        return sets

    @contextlib.contextmanager
    def patched(self, params: torch.Tensor | None, slots: torch.Tensor | None = None, routing=None):
        with contextlib.ExitStack() as stack:
            first = 0
            for part in self.parts:
                width = part.layout.size
                if width:
                    stack.enter_context(part.patched(params[:, first:first + width], slots, routing))
                    first += width
            yield

    def export(self, z: torch.Tensor, request: ExportRequest) -> Exported:
        raise not_exportable(self.config.kind)

    @property
    def z_blocks(self) -> list[tuple[str, int]]:
        """One block per part, named by its kind, then the gates (if any)."""
        blocks = [(kind, dim) for kind, dim in zip(self.kinds, self.dims)]
        return blocks + ([("gates", self.num_gates)] if self.num_gates else [])


def not_exportable(kind: str) -> InvalidArgument:
    return InvalidArgument(f"delta kind {kind!r} combines kinds ('+', 'unipelt:'), which cannot be exported; "
                           f"exportable kinds: {', '.join(exportable_kinds())} (one kind each), and adamix:KIND "
                           "(its copies merged)")


def _kinds_with(capability: str) -> list[str]:
    return [name for name, cls in DELTA_KINDS.items() if getattr(cls, capability)]
