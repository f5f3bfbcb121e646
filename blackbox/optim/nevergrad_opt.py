"""Any optimizer of ``nevergrad.optimizers.registry``, as ``ng:<NAME>`` (e.g. ``ng:NGOpt``).

The search space is ``ng.p.Array(init=zeros(dim))`` with ``set_mutation(sigma=sigma0)``
and, when bounds are given, ``set_bounds(lower, upper, method=bounds_method)``. The
optimizer gets ``num_workers=popsize`` so that it accepts a whole generation of asks
before the tells, and its parametrization gets ``np.random.RandomState(seed)``.

Options: ``budget`` -- total number of candidate evaluations (nevergrad counts tells,
not generations), default None; ``bounds_method`` -- nevergrad's bound handling
("bouncing" by default, "clipping", "arctan", "tanh", ...), only with bounds.

Quirks handled here:

* Meta-optimizers such as NGOpt choose their algorithm from the budget and fail with a
  bare AssertionError when there is none; that becomes a ValueError asking for
  ``options={"budget": ...}``, raised by the constructor.
* Optimizers that run scipy in a worker thread only pickle after ``enable_pickling()``
  before the first ask, so it is always called (they then keep their tell history).
* nevergrad 1.0.12's metamodels break under NumPy >= 2.4 (see ``_import_nevergrad``).
* Several nevergrad optimizers also draw from the global ``np.random``, so every call
  runs inside a private global-RNG state (see ``GlobalRNGSandbox``); otherwise neither
  determinism nor bit-exact resume would hold, and the caller's RNG would be consumed.
* nevergrad's own stopping only comes through callbacks; ``stop()`` here is "budget used".

nevergrad is imported lazily: with pycma it costs ~3 s of import time.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .base import BaseOptimizer, _check_int, register_optimizer

PREFIX = "ng:"


_SHIM_MARK = "_blackbox_numpy24_shim"


def _import_nevergrad() -> Any:
    """Import nevergrad, with a guard for its metamodel under NumPy >= 2.4.

    nevergrad 1.0.12's ``learn_on_k_best`` does ``float(model.predict(x[None, :]))`` on a
    1-element array, which NumPy 2.4 turned from a deprecation into a TypeError. Any
    metamodel optimizer (NGOpt picks "CMA + quadratic metamodel" on smooth problems) then
    crashes inside ask() once its archive is large enough -- and the crash leaves the
    metamodel's scipy-Powell worker thread blocked, which can hang interpreter exit. The
    guard turns that TypeError into nevergrad's own ``MetaModelFailure``, on which the
    optimizer falls back to its base algorithm, as it does when a metamodel is unlearnable.
    """
    import nevergrad as ng
    from nevergrad.optimization import differentialevolution, metamodel, optimizerlib

    original = metamodel.learn_on_k_best
    if not getattr(original, _SHIM_MARK, False):

        def learn_on_k_best(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except TypeError as exc:
                raise metamodel.MetaModelFailure(f"metamodel unusable with this NumPy: {exc}") from exc

        setattr(learn_on_k_best, _SHIM_MARK, True)
        # optimizerlib imported the name; differentialevolution looks it up on the module.
        metamodel.learn_on_k_best = learn_on_k_best
        optimizerlib.learn_on_k_best = learn_on_k_best
        assert differentialevolution.metamodel is metamodel
    return ng


def nevergrad_optimizer_names() -> list[str]:
    """Every ``ng:<NAME>`` this installation of nevergrad offers."""
    ng = _import_nevergrad()

    return [PREFIX + n for n in sorted(ng.optimizers.registry)]


def _resolve_name(full_name: str) -> str:
    ng = _import_nevergrad()

    registry = ng.optimizers.registry
    name = full_name[len(PREFIX) :]
    if name in registry:
        return name
    by_lower: dict[str, list[str]] = {}
    for n in registry:
        by_lower.setdefault(n.lower(), []).append(n)
    close = [m for c in difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6) for m in by_lower[c]]
    hint = f"close matches: {', '.join(PREFIX + c for c in close)}" if close else "no close match"
    raise ValueError(
        f"unknown nevergrad optimizer {full_name!r} ({hint}); nevergrad.optimizers.registry has "
        f"{len(registry)} names, e.g. ng:NGOpt, ng:TwoPointsDE, ng:PSO, ng:OnePlusOne, ng:CMA"
    )


@register_optimizer(PREFIX, family=True)
class NevergradOptimizer(BaseOptimizer):
    option_defaults = {"budget": None, "bounds_method": "bouncing"}
    isolate_global_rng = True

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if "bounds_method" in options and self.bounds is None:
            raise ValueError(f"{self.name}: option 'bounds_method' needs bounds")
        options = super()._resolve_options(options)
        if options["budget"] is not None:
            options["budget"] = _check_int(f"{self.name} option 'budget'", options["budget"], minimum=1)
        return options

    def _setup(self) -> None:
        ng = _import_nevergrad()

        self.ng_name = _resolve_name(self.name)
        param = ng.p.Array(init=np.zeros(self.dim))
        if self.bounds is not None:
            param.set_bounds(self.bounds[0], self.bounds[1], method=self.options["bounds_method"])
        param.set_mutation(sigma=self.sigma0)
        param.random_state = np.random.RandomState(self.seed)
        try:
            self.ng_optimizer = ng.optimizers.registry[self.ng_name](
                parametrization=param, budget=self.options["budget"], num_workers=self.popsize
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{self.name}: nevergrad refused dim={self.dim}, popsize={self.popsize}: {exc}") from exc
        # Optimizers driving scipy in a worker thread (Powell, SQP, ..., and NGOpt when it
        # picks one) only pickle, hence checkpoint, if told so before their first ask.
        # For meta-optimizers this also makes them pick their algorithm now, so a missing
        # budget fails here rather than at the first ask.
        with self._budget_hint():
            self.ng_optimizer.enable_pickling()
        self._asked: list[Any] = []

    @contextmanager
    def _budget_hint(self) -> Iterator[None]:
        # Meta-optimizers (NGOpt & co.) assert on a missing budget; say what to do instead.
        try:
            yield
        except AssertionError as exc:
            if self.options["budget"] is None:
                raise ValueError(
                    f"{self.name} needs a budget: pass options={{'budget': <total candidate evaluations>}}"
                ) from exc
            raise

    def _ask(self) -> np.ndarray:
        with self._budget_hint():
            self._asked = [self.ng_optimizer.ask() for _ in range(self.popsize)]
        return np.stack([np.asarray(c.value, dtype=np.float64).reshape(self.dim) for c in self._asked])

    def _tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        # Positions match the asks one to one: base.tell already checked the rows.
        for candidate, loss in zip(self._asked, losses):
            self.ng_optimizer.tell(candidate, float(loss))
        self._asked = []

    def _stop(self) -> bool:
        budget = self.options["budget"]
        return budget is not None and self.ng_optimizer.num_tell >= budget
