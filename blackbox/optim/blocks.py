"""Divide and conquer over blocks of z (BBTv2): one optimizer per block, taking turns.

BBTv2 gives every layer of a deep prompt its own z_l and optimises them one layer at a
time, each with its own CMA-ES, the other layers held at their current values. Here the
blocks are whatever the server's session reports (``Session.z_blocks``): the layers of a
per-layer deep prompt, or the parts of a combination ("prompt", "lora", "gates").

The state is an incumbent z (the lowest train loss seen, starting at z = 0) and one inner
optimizer per block, all of the same method, each searching its block's coordinates.
A turn is ``turn_generations`` generations of one block's optimizer: its candidates are
the incumbent with that block replaced, and after each generation the incumbent takes
the generation's best candidate if it lowers the loss. Blocks take turns in order,
skipping those whose optimizer has stopped; the whole stops when all have.

Each inner optimizer keeps its own state across turns (its mean, step size and
covariance pick up where its last turn ended), while the other blocks may have moved
meanwhile: its losses come from a landscape that shifts between turns, as in BBTv2.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import BaseOptimizer, make_optimizer, optimizer_class
from .checks import check_int

# Inner optimizer i is seeded with seed + i * BLOCK_SEED_STRIDE (under 2**32 for pycma).
BLOCK_SEED_STRIDE = 7919


class DivideAndConquer(BaseOptimizer):
    """Options: ``blocks`` (sizes summing to dim, required), ``inner`` (the per-block
    method's name, default "cma"), ``turn_generations`` (default 1) and ``inner_options``
    (passed to every inner optimizer)."""

    option_defaults = {"blocks": None, "inner": "cma", "turn_generations": 1, "inner_options": None}

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super()._resolve_options(options)
        blocks = options["blocks"]
        if not blocks or not all(isinstance(b, (int, np.integer)) and b >= 1 for b in blocks):
            raise ValueError(f"divide and conquer needs block sizes >= 1, got {blocks!r}")
        if sum(blocks) != self.dim:
            raise ValueError(f"block sizes {list(blocks)} sum to {sum(blocks)}, not to dim {self.dim}")
        inner = optimizer_class(options["inner"])  # ValueError for unknown names
        if inner.uses_gradients:
            raise ValueError(f"divide and conquer takes gradient-free methods; {options['inner']!r} uses gradients")
        if inner.fixed_popsize:
            raise ValueError(f"{options['inner']!r} has a fixed popsize; divide and conquer needs a population")
        options["blocks"] = tuple(int(b) for b in blocks)
        options["turn_generations"] = check_int("turn_generations", options["turn_generations"], minimum=1)
        options["inner_options"] = dict(options["inner_options"] or {})
        return options

    def _setup(self) -> None:
        blocks = self.options["blocks"]
        self.starts = np.cumsum((0,) + blocks).tolist()
        self.inner = [
            make_optimizer(self.options["inner"], dim=size, popsize=self.popsize,
                           seed=(self.seed + i * BLOCK_SEED_STRIDE) % 2**32, sigma0=self.sigma0,
                           bounds=self.bounds, options=self.options["inner_options"] or None)
            for i, size in enumerate(blocks)
        ]
        self.incumbent = np.zeros(self.dim)
        self.incumbent_loss = math.inf
        self.active = 0  # the block whose turn it is (the one the pending ask changes)
        self.turn_done = 0  # generations of the active block's current turn

    def _next_turn(self) -> None:
        self.turn_done = 0
        for step in range(1, len(self.inner) + 1):
            block = (self.active + step) % len(self.inner)
            if not self.inner[block].stop():
                self.active = block
                return

    def _ask(self) -> np.ndarray:
        if self.inner[self.active].stop():
            self._next_turn()
        sub = self.inner[self.active].ask()
        candidates = np.tile(self.incumbent, (self.popsize, 1))
        candidates[:, self.starts[self.active]:self.starts[self.active + 1]] = sub
        return candidates

    def _tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        block = slice(self.starts[self.active], self.starts[self.active + 1])
        self.inner[self.active].tell(candidates[:, block], losses)
        leader = int(np.argmin(losses))
        if losses[leader] < self.incumbent_loss:
            self.incumbent = candidates[leader].copy()
            self.incumbent_loss = float(losses[leader])
        self.turn_done += 1
        if self.turn_done >= self.options["turn_generations"]:
            self._next_turn()

    def _stop(self) -> bool:
        return all(inner.stop() for inner in self.inner)

    @property
    def active_block(self) -> int:
        return self.active
