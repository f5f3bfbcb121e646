"""AdaMix ("adamix:KIND", "adamixM:KIND"): M copies of one mixable kind (the weight kinds),
routed per example while searching and merged by averaging everywhere else.

Copy j is the kind built with seed + j * PART_SEED_STRIDE (its own projection of the
whole z) sharing copy 0's fixed start (LoRA's A0, the adapter's W_d0), so parameters(z)
is (P, M * D), the copies' layouts one after another. On the routed splits
(ROUTED_SPLIT, "train", the search split, and any split whose name ends with
ROUTED_SUFFIX, "-routed") each example goes to one copy drawn from (session seed, the
example's index in the split): deterministic, the same for every candidate and every
call. Every other split is scored with the copies MERGED by averaging their parameters
(weights) into one module. So a client that registers its test examples a second time
as "test-routed", and its training examples as "train-merged", gets both scores of both
(the tuner does).

Routed rows get per-row parameters: the copy's `patched` runs with p * B "candidates" of
one row each (memory p * B * D per chunk on the search split; the merged path uses
p * D). The export is the merged form: the kind's own export of the averaged parameters.
"""

from __future__ import annotations

import numpy as np
import torch

from backbone_server.deltas.base import DELTA_KINDS, Delta, DeltaConfig, Routing, kind_class
from backbone_server.deltas.budget import current_budget, derived_seed
from backbone_server.deltas.combined import PART_SEED_STRIDE
from backbone_server.deltas.exported import Exported, ExportRequest
from backbone_server.deltas.layout import Layout
from backbone_server.errors import InvalidArgument

ROUTED_SPLIT = "train"
ROUTED_SUFFIX = "-routed"
DEFAULT_COPIES = 4
MAX_COPIES = 64
ROUTE_SALT = 0xADA


def is_routed(split: str) -> bool:
    """Whether AdaMix routes the examples of `split` to copies (else it merges them)."""
    return split == ROUTED_SPLIT or split.endswith(ROUTED_SUFFIX)


def mixable_kinds() -> list[str]:
    return [name for name, cls in DELTA_KINDS.items() if cls.mixable]


class AdaMixDelta(Delta):
    def __init__(self, config: DeltaConfig, backbone, kinds: tuple[str, ...], copies: int = 0):
        copies = copies or DEFAULT_COPIES
        if not 1 <= copies <= MAX_COPIES:
            raise InvalidArgument(f"adamix needs 1 .. {MAX_COPIES} copies, got {str(copies)[:20]}"
                                  f"{'...' if len(str(copies)) > 20 else ''}: write adamix:KIND or adamixM:KIND "
                                  f"with M <= {MAX_COPIES}")
        kind = "+".join(kinds)
        if len(kinds) != 1 or not kind_class(kinds[0], config.kind).mixable:
            raise InvalidArgument(f"adamix takes one weight kind ({', '.join(mixable_kinds())}), got {kind!r}")
        self._bind(config, backbone)
        self.kind = kind
        self.num_copies = copies
        self.copies: list[Delta] = []
        budget = current_budget()
        for j in range(copies):
            part_config = DeltaConfig(kind, prompt_length=config.prompt_length, intrinsic_dim=config.intrinsic_dim,
                                      projection=config.projection,
                                      seed=derived_seed(config.seed, j * PART_SEED_STRIDE),
                                      projection_scale=config.projection_scale, rank=config.rank,
                                      targets=config.targets)
            before = budget.used
            copy = DELTA_KINDS[kind](part_config, backbone)
            if j == 0 and copies > 1:  # the other copies cost as much: refused before any is built
                budget.check((budget.used - before) * (copies - 1),
                             f"the other {copies - 1} of adamix's {copies} copies of {kind!r}")
            if self.copies:
                copy.start = self.copies[0].start  # one fixed start (A0 / W_d0), M projections
            self.copies.append(copy)
        self.size = self.copies[0].layout.size
        self.layout = Layout.concat(copy.layout for copy in self.copies)
        self.changes_prefix = self.copies[0].changes_prefix
        self.description = f"adamix of {copies} copies of: {self.copies[0].description or kind}"
        self._routes: dict[int, int] = {}

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
        return self.copies[0].patched(self._copy_parameters(params, routing), slots)

    @property
    def row_local(self) -> bool:
        return self.copies[0].row_local

    @property
    def row_hooks_pre(self) -> bool:
        return self.copies[0].row_hooks_pre

    def row_hook_sets(self, params: torch.Tensor, slots: torch.Tensor | None = None,
                      routing: Routing | None = None) -> list:
        return self.copies[0].row_hook_sets(self._copy_parameters(params, routing), slots)

    def _copy_parameters(self, params: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        """What the copy's hooks take: (p, D) the copies averaged, or on a routed split
        (p * B, D), each row its candidate's copy for its example (p * B candidates of a
        row each)."""
        p = params.shape[0]
        copies = params.view(p, self.num_copies, self.size)
        if routing is None or not is_routed(routing.split):
            return copies.mean(dim=1)
        route = torch.tensor(self.route(routing.indices), device=params.device)  # (B,)
        return copies[:, route].reshape(p * len(route), self.size)  # (p, B, D) rows, candidate-major

    def export(self, z: torch.Tensor, request: ExportRequest) -> Exported:
        """AdaMix's inference form: the copies' parameters averaged into one module."""
        if request.fold_prefix:
            raise InvalidArgument("only a soft or deep prompt can fold the tokens ahead of it")
        merged = self.parameters(z)[0].view(self.num_copies, self.size).mean(dim=0)
        exported = self.copies[0].export_parameters(merged, request)
        exported.description = f"{self.description}, merged by averaging"
        return exported
