"""Two stages (BBT-RGB, Sun et al. 2023): CMA-ES, then a local polish of its best point.

CMA-ES covers the subspace fast but, in the few generations a black-box budget allows,
ends with a wide step size that keeps sampling away from its best point. The second
stage spends the rest of the budget on a (1 + lambda) evolution strategy around the
incumbent: each generation tries `popsize` Gaussian steps from it, moves to the best if
that beats it, and adapts the step by the one-fifth success rule (Rechenberg), starting
from the share `polish_sigma` of CMA-ES's final step size. BBT-RGB uses COBYLA for this
stage; a batched local method keeps each generation one call of `popsize` candidates.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import BaseOptimizer, register_optimizer
from .checks import check_option_keys
from .cma_es import CMAES

# The one-fifth rule's factors: a success widens the step, a failure narrows it, so that
# the step holds still when one generation in five succeeds.
_WIDEN = 1.5
_NARROW = _WIDEN ** -0.25


@register_optimizer("cma-polish")
class CMAThenPolish(BaseOptimizer):
    """CMA-ES, then a (1+lambda)-ES polish of its best z for the last polish_share of the budget (BBT-RGB)."""

    min_popsize = 2
    option_defaults = {"budget": None, "polish_share": 0.3, "polish_sigma": 0.3}
    option_help = {
        "budget": "the run's budget in candidates (tune passes it): where the second stage starts",
        "polish_share": "the share of the budget the polish gets (0 < share < 1)",
        "polish_sigma": "the polish's first step as a share of CMA-ES's step size when it hands over",
    }

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        check_option_keys(self.name, options, list(self.option_defaults))
        resolved = {**self.option_defaults, **options}
        if resolved["budget"] is None or int(resolved["budget"]) < 2 * self.popsize:
            raise ValueError(f"{self.name}: needs the run's budget (at least two generations of {self.popsize}), "
                             f"got {resolved['budget']!r}")
        if not 0 < float(resolved["polish_share"]) < 1:
            raise ValueError(f"{self.name}: polish_share must be between 0 and 1, got {resolved['polish_share']!r}")
        if not float(resolved["polish_sigma"]) > 0:
            raise ValueError(f"{self.name}: polish_sigma must be > 0, got {resolved['polish_sigma']!r}")
        return resolved

    def _setup(self) -> None:
        generations = int(self.options["budget"]) // self.popsize
        polish = max(1, round(generations * float(self.options["polish_share"])))
        self.search_generations = max(1, generations - polish)
        self.search = CMAES("cma", self.dim, self.popsize, self.seed, sigma0=self.sigma0, bounds=self.bounds)
        self.rng = np.random.default_rng([self.seed, 0x9013])
        self.incumbent: np.ndarray | None = None
        self.incumbent_loss = math.inf
        self.step = 0.0

    @property
    def polishing(self) -> bool:
        return self.generation >= self.search_generations

    def _ask(self) -> np.ndarray:
        if not self.polishing:
            return self.search.ask()
        if self.incumbent is None:  # the hand-over: CMA-ES's best and its last step size
            self.incumbent, self.incumbent_loss = self.search.best
            self.step = float(self.options["polish_sigma"]) * float(self.search.es.sigma)
        steps = self.rng.standard_normal((self.popsize, self.dim)) * self.step
        candidates = self.incumbent[None, :] + steps
        if self.bounds is not None:
            candidates = np.clip(candidates, *self.bounds)
        return candidates

    def _tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        if not self.polishing:
            self.search.tell(candidates, losses)
            return
        i = int(np.argmin(losses))
        if losses[i] < self.incumbent_loss:
            self.incumbent, self.incumbent_loss = candidates[i].copy(), float(losses[i])
            self.step *= _WIDEN
        else:
            self.step *= _NARROW

    def _stop(self) -> bool:
        return False
