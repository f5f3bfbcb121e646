"""CMA-ES through pycma, used as is: ``cma`` (full covariance) and ``sep-cma`` (diagonal).

Seeding: pycma draws its samples through the ``randn`` option, which by default is the
*global* ``np.random.randn`` seeded with ``np.random.seed(opts["seed"])`` -- and it treats
seed 0 (and None) as "seed from the clock". We instead hand pycma a private
``np.random.RandomState(seed).randn`` and pass ``seed=nan`` (pycma's "leave the RNG alone"):

* our seed 0 is as deterministic as any other;
* for seed >= 1 the samples are exactly those of plain pycma with ``{"seed": seed}``;
* two optimizers, or the caller's own use of ``np.random``, cannot perturb each other;
* the RandomState is pickled with the pycma object, so checkpoints resume bit-exactly.

pycma is imported lazily: it costs ~2 s of import time, which a client that uses another
optimizer should not pay.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np

from .base import BaseOptimizer, register_optimizer
from .checks import check_option_keys

# Options that come from make_optimizer's own arguments (or from how we seed pycma).
_CONTROLLED = ("popsize", "seed", "bounds", "randn")


def _pycma_option_names() -> set[str]:
    import cma

    return set(cma.CMAOptions())


class _PycmaOptimizer(BaseOptimizer):
    min_popsize = 2  # pycma needs at least two recombination weights
    fixed_options: ClassVar[dict[str, Any]] = {}
    # pycma takes any of its CMAOptions; these are the ones a tuning run most often sets.
    option_help = {
        "CMA_active": "True: active CMA (negative covariance update); False: plain rank-mu",
        "CMA_diagonal": "True: diagonal covariance throughout (what sep-cma fixes); N: for the first N generations",
        "CMA_elitist": "False; True keeps the best point in the population",
        "tolfun": "1e-11: stop once the losses of recent generations differ by less",
        "(any other)": "every key of pycma's cma.CMAOptions() but popsize, seed, bounds and randn",
    }

    @classmethod
    def describe_options(cls) -> dict[str, str]:
        return {name: text for name, text in super().describe_options().items() if name not in cls.fixed_options}

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        given_by_us = set(_CONTROLLED) | set(self.fixed_options)
        clash = sorted(set(options) & given_by_us)
        if clash:
            raise ValueError(
                f"option(s) {clash} of {self.name!r} are set by make_optimizer's own arguments "
                "(popsize, seed, bounds) or by the optimizer itself; pass them there"
            )
        check_option_keys(self.name, options, _pycma_option_names() - given_by_us)
        return options

    def _setup(self) -> None:
        import cma

        opts: dict[str, Any] = {
            "verbose": -9,  # also switches off pycma's outcmaes/ data files
            **self.options,
            **self.fixed_options,
            "popsize": self.popsize,
            "seed": math.nan,
            "randn": np.random.RandomState(self.seed).randn,
        }
        if self.bounds is not None:
            opts["bounds"] = list(self.bounds)
        with warnings.catch_warnings(record=True) as heard:
            warnings.simplefilter("always")
            self.es = cma.CMAEvolutionStrategy(np.zeros(self.dim), self.sigma0, opts)
        # pycma only warns about an option value it cannot read ("Flase"), then runs on
        # with a guess; a tuning run must not spend its budget on a typo.
        unreadable = sorted({str(w.message).split(" is not a safe string")[0] for w in heard
                             if "is not a safe string" in str(w.message)})
        if unreadable:
            raise ValueError(f"{self.name}: pycma cannot read the option value(s) {', '.join(unreadable)} (use a "
                             "number, True, False, or an expression of N and popsize)")
        for warning in heard:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    def _ask(self) -> np.ndarray:
        return np.asarray(self.es.ask())

    def _tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        # Rows of the asked array, bit-equal to what pycma handed out: with bounds pycma finds
        # each one's internal (unrepaired) genotype again by its bytes.
        self.es.tell(list(candidates), losses.tolist())

    def _stop(self) -> bool:
        return bool(self.es.stop())


@register_optimizer("cma")
class CMAES(_PycmaOptimizer):
    """Full-covariance CMA-ES. O(d^2) memory and time per sample; fine up to d ~ 1000."""


@register_optimizer("sep-cma")
class SepCMAES(_PycmaOptimizer):
    """Separable CMA-ES (pycma ``CMA_diagonal=True``): O(d) per sample, for large d."""

    fixed_options = {"CMA_diagonal": True}
