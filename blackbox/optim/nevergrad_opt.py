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
* Optimizers that run scipy in a worker thread (Powell, SQP, Cobyla, ...) cannot be
  checkpointed (their pickled replay fails to load) and a live one hangs interpreter
  exit; they are refused (they only accept popsize 1 anyway). ``enable_pickling()`` is
  still called on every optimizer before its first ask, as nevergrad requires.
* nevergrad 1.0.12's metamodels break under NumPy >= 2.4 (see ``_import_nevergrad``).
* nevergrad's CMA (ng:CMA, and NGOpt when it picks it) crashes at d >= 300 unless
  popsize >= 4 + 3 ln d; refused up front (see ``_refuse_misaligned_cma``).
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

from .base import BaseOptimizer, register_optimizer
from .checks import check_int

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


def _threaded_parts(optimizer: Any, depth: int = 0) -> list[str]:
    """Names of the thread-based (recast) optimizers in ``optimizer`` and its wrapped ones."""
    from nevergrad.optimization.base import Optimizer as NgOptimizer
    from nevergrad.optimization.recaster import RecastOptimizer

    if isinstance(optimizer, RecastOptimizer):
        return [optimizer.name]
    if depth > 4:
        return []
    found: list[str] = []
    for value in vars(optimizer).values():  # NGOpt's _optim, chains' optimizers, portfolios' optims
        children = value if isinstance(value, (list, tuple)) else [value]
        for child in children:
            if isinstance(child, NgOptimizer):
                found += _threaded_parts(child, depth + 1)
    return found


def _misaligned_cma(optimizer: Any, popsize: int, depth: int = 0) -> tuple[int, bool]:
    """(pycma population, elitist) of a nevergrad CMA in ``optimizer`` that popsize breaks, else (0, False)."""
    from cma.evolution_strategy import TPA_dimension
    from nevergrad.optimization.base import Optimizer as NgOptimizer
    from nevergrad.optimization.optimizerlib import _CMA

    if isinstance(optimizer, _CMA):
        config = optimizer._config
        uses_tpa = optimizer.dimension >= TPA_dimension and (config.inopts or {}).get("AdaptSigma", True) is True
        if uses_tpa and not config.fcmaes and optimizer._popsize > popsize:
            return optimizer._popsize, bool(config.elitist)
        return 0, False
    if depth <= 4:
        for value in vars(optimizer).values():
            for child in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(child, NgOptimizer):
                    found = _misaligned_cma(child, popsize, depth + 1)
                    if found[0]:
                        return found
    return 0, False


@register_optimizer(PREFIX, family=True)
class NevergradOptimizer(BaseOptimizer):
    option_defaults = {"budget": None, "bounds_method": "bouncing"}
    option_help = {"budget": "candidate evaluations the method plans for (a tuning run sets its own budget)",
                   "bounds_method": "how a --bound box is kept: bouncing, clipping, arctan, tanh, ..."}
    isolate_global_rng = True

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if "bounds_method" in options and self.bounds is None:
            raise ValueError(f"{self.name}: option 'bounds_method' needs bounds")
        options = super()._resolve_options(options)
        if options["budget"] is not None:
            options["budget"] = check_int(f"{self.name} option 'budget'", options["budget"], minimum=1)
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
        # nevergrad wants this before the first ask from optimizers that are only optionally
        # picklable (checkpoints need pickling). For meta-optimizers it also makes them pick
        # their algorithm now, so the checks below see it and a missing budget fails here.
        with self._explained_failures():
            self.ng_optimizer.enable_pickling()
        self._refuse_threaded()
        self._refuse_misaligned_cma()
        self._asked: list[Any] = []

    def _refuse_misaligned_cma(self) -> None:
        # nevergrad's CMA gives pycma popsize max(num_workers, 4 + 3 ln d) and refills from a
        # fresh es.ask() whenever its queue runs dry, telling pycma only per full pycma
        # generation. With popsize below that, the batches drift apart and es.ask() gets
        # called twice without a tell, which pycma >= 4 forbids once it uses TPA step-size
        # adaptation (d >= 300): RuntimeError "Mean shift samples are expected but missing"
        # a dozen generations in. Refuse up front, with the popsize that works.
        need, elitist = _misaligned_cma(self.ng_optimizer, self.popsize)
        if need:
            fix = (
                "no popsize avoids it (its elitist variant always takes popsize + 1)"
                if elitist
                else f"popsize >= {need} avoids it (NGOpt may then pick another variant)"
            )
            raise ValueError(
                f"{self.name} runs nevergrad's CMA with a pycma population of {need} > popsize "
                f"{self.popsize}; at d={self.dim} (pycma's TPA step-size adaptation) nevergrad then "
                f"crashes after a few generations. {fix[0].upper() + fix[1:]}; otherwise use 'cma' or 'sep-cma'"
            )

    def _refuse_threaded(self) -> None:
        # nevergrad's scipy wrappers (Powell, SQP, Cobyla, ...) run scipy in a non-daemon
        # worker thread: a checkpoint of one fails to load ("Mismatch in replay"), and a
        # live one blocked on its queue keeps the interpreter from exiting. They only take
        # popsize 1 anyway, so they are refused rather than half supported.
        threaded = _threaded_parts(self.ng_optimizer)
        if threaded:
            raise ValueError(
                f"{self.name}: runs {', '.join(threaded)} in a scipy worker thread, which cannot be "
                "checkpointed or cleanly shut down; pick a population-based optimizer instead"
            )

    @contextmanager
    def _explained_failures(self) -> Iterator[None]:
        # Turn nevergrad's cryptic failures into ones that say what to do.
        try:
            yield
        except AssertionError as exc:  # meta-optimizers (NGOpt & co.) without a budget
            if self.options["budget"] is None:
                raise ValueError(
                    f"{self.name} needs a budget: pass options={{'budget': <total candidate evaluations>}}"
                ) from exc
            raise
        except RuntimeError as exc:  # a CMA that a chain switched to after construction
            if "Mean shift samples" not in str(exc):
                raise
            raise RuntimeError(
                f"{self.name}: nevergrad's CMA broke pycma's ask/tell pairing (population larger than "
                f"popsize={self.popsize} at d >= 300); use 'cma' or 'sep-cma'"
            ) from exc

    def _ask(self) -> np.ndarray:
        with self._explained_failures():
            self._asked = [self.ng_optimizer.ask() for _ in range(self.popsize)]
        return np.stack([np.asarray(c.value, dtype=np.float64).reshape(self.dim) for c in self._asked])

    def _tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        # Positions match the asks one to one: base.tell already checked the rows.
        for candidate, loss in zip(self._asked, losses):
            self.ng_optimizer.tell(candidate, float(loss))
        self._asked = []

    def state_dict(self) -> bytes:
        self._refuse_threaded()  # a chain may have switched to one since construction
        return super().state_dict()

    def _stop(self) -> bool:
        budget = self.options["budget"]
        return budget is not None and self.ng_optimizer.num_tell >= budget
