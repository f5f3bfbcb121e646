"""Optimizer protocol, registry, and the plumbing every optimizer shares.

All optimizers search float64 vectors z of length ``dim`` starting from z = 0 (the
unmodified prompt). One generation is ``popsize`` candidates that the run loop scores in
one batched call, so the contract is strictly ask -> tell -> ask -> ...:

* ``ask()`` is idempotent until the matching ``tell()``: asking again returns the same
  candidates, so a run loop that retries a failed evaluation cannot skew the search.
* ``tell()`` must get exactly the asked candidates (same rows, same order) and finite
  losses; anything else raises ``ValueError`` and leaves the optimizer untouched, so the
  caller can fix the input and tell again.
* Optimizers with ``uses_gradients`` (the white-box ``gradient``) also need d loss / d z
  for every candidate: ``tell(candidates, losses, gradients)``. The others refuse them.
* ``state_dict()`` pickles everything (including a pending ask), so a resumed optimizer
  produces bit-identical future asks. Only load states from a trusted source.

This package must stay free of torch: the client runs on machines without it.
"""

from __future__ import annotations

import difflib
import math
import pickle
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Mapping, Protocol, TypeVar, runtime_checkable

import numpy as np

from .checks import check_bounds, check_int, check_option_keys, check_positive_float, same
from .isolation import GlobalRNGSandbox, pinned_blas

__all__ = [
    "Optimizer",
    "BaseOptimizer",
    "available_optimizers",
    "make_optimizer",
    "optimizer_class",
    "register_optimizer",
]


@runtime_checkable
class Optimizer(Protocol):
    dim: int
    popsize: int
    calls_per_candidate: int
    uses_gradients: bool

    def ask(self) -> np.ndarray: ...

    def tell(self, candidates: np.ndarray, losses: np.ndarray, gradients: np.ndarray | None = None) -> None: ...

    def stop(self) -> bool: ...

    @property
    def best(self) -> tuple[np.ndarray, float]: ...

    @property
    def active_block(self) -> int | None: ...

    def state_dict(self) -> bytes: ...

    def load_state_dict(self, state: bytes) -> None: ...


# ------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, type[BaseOptimizer]] = {}
_FAMILIES: dict[str, type[BaseOptimizer]] = {}  # name prefix ("ng:") -> class

T = TypeVar("T", bound="type[BaseOptimizer]")


def register_optimizer(name: str, *, family: bool = False) -> Callable[[T], T]:
    """Class decorator adding an optimizer under ``name``.

    With ``family=True``, ``name`` is a prefix ending in ":" and the class serves every
    ``<prefix><SUFFIX>`` name (it receives the full name and parses the suffix itself).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"optimizer name must be a non-empty string, got {name!r}")
    if family and not name.endswith(":"):
        raise ValueError(f"a family name is a prefix ending in ':', got {name!r}")

    def decorator(cls: T) -> T:
        if name in _REGISTRY or name in _FAMILIES:
            owner = (_REGISTRY.get(name) or _FAMILIES[name]).__qualname__
            raise ValueError(f"optimizer {name!r} is already registered (by {owner})")
        for prefix in _FAMILIES:
            if name.startswith(prefix):
                raise ValueError(f"optimizer {name!r} would be shadowed by the {prefix!r} family")
        if family:
            clash = [n for n in _REGISTRY if n.startswith(name)]
            if clash:
                raise ValueError(f"family {name!r} would shadow registered optimizers {clash}")
            _FAMILIES[name] = cls
        else:
            _REGISTRY[name] = cls
        return cls

    return decorator


def available_optimizers() -> list[str]:
    """Registered names; a family appears once, as e.g. ``"ng:<NAME>"``."""
    return sorted(_REGISTRY) + [f"{prefix}<NAME>" for prefix in sorted(_FAMILIES)]


def optimizer_class(name: str) -> type[BaseOptimizer]:
    """The class serving `name`, without building it; ValueError for unknown names."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None and isinstance(name, str):
        cls = next((c for prefix, c in _FAMILIES.items() if name.startswith(prefix)), None)
    if cls is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY) + list(_FAMILIES), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown optimizer {name!r}; known optimizers: {', '.join(available_optimizers())}.{hint}"
        )
    return cls


def make_optimizer(
    name: str,
    dim: int,
    popsize: int,
    seed: int,
    sigma0: float = 1.0,
    bounds: tuple[float, float] | None = None,
    options: Mapping[str, Any] | None = None,
) -> BaseOptimizer:
    """Build a registered optimizer. The same arguments always give the same asks."""
    return optimizer_class(name)(name, dim, popsize, seed, sigma0=sigma0, bounds=bounds, options=options)


# --------------------------------------------------------------------------- base class

_STATE_FORMAT = 1


class BaseOptimizer(ABC):
    """Validation, ask/tell bookkeeping, best tracking and checkpointing.

    Subclasses implement ``_setup``, ``_ask``, ``_tell`` and ``_stop``; all four run with
    BLAS pinned to one thread (and, with ``isolate_global_rng``, inside a private global
    numpy RNG). ``_tell`` only ever sees validated input.
    """

    calls_per_candidate: int = 1
    uses_gradients: ClassVar[bool] = False
    # Set when the method has its own generation size (one point per gradient step).
    fixed_popsize: ClassVar[int | None] = None
    option_defaults: ClassVar[Mapping[str, Any]] = {}
    # What each option means, for `blackbox optimizers` (options without a line are listed bare).
    option_help: ClassVar[Mapping[str, str]] = {}
    min_popsize: ClassVar[int] = 1
    isolate_global_rng: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        dim: int,
        popsize: int,
        seed: int,
        sigma0: float = 1.0,
        bounds: tuple[float, float] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.dim = check_int("dim", dim, minimum=1)
        self.popsize = self.fixed_popsize or check_int("popsize", popsize, minimum=self.min_popsize)
        # < 2**32 because numpy's legacy RandomState (pycma, nevergrad) takes 32-bit seeds.
        self.seed = check_int("seed", seed, minimum=0, maximum=2**32 - 1)
        self.sigma0 = check_positive_float("sigma0", sigma0)
        self.bounds = check_bounds(bounds)
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict or None, got {type(options).__name__}")
        self.options = self._resolve_options(dict(options or {}))
        self.generation = 0  # completed ask/tell rounds
        self._pending: np.ndarray | None = None
        self._best_x: np.ndarray | None = None
        self._best_loss = math.inf
        self._rng_sandbox = GlobalRNGSandbox(self.seed) if self.isolate_global_rng else None
        with self._compute_context():
            self._setup()

    @classmethod
    def describe(cls) -> str:
        """One line on the method: its class docstring's first line, else its module's."""
        import sys

        text = cls.__doc__ or sys.modules[cls.__module__].__doc__ or cls.__name__
        return text.strip().splitlines()[0]

    @classmethod
    def describe_options(cls) -> dict[str, str]:
        """Option -> its default and meaning, as `--optimizer-option KEY=VALUE` takes them."""
        described = {name: f"{default!r}" + (f": {cls.option_help[name]}" if name in cls.option_help else "")
                     for name, default in cls.option_defaults.items()}
        return {**described, **{name: text for name, text in cls.option_help.items() if name not in described}}

    # ------------------------------------------------------------------ subclass hooks

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Check option keys and fill defaults; override for value checks."""
        check_option_keys(self.name, options, list(self.option_defaults))
        return {**self.option_defaults, **options}

    @abstractmethod
    def _setup(self) -> None: ...

    @abstractmethod
    def _ask(self) -> np.ndarray: ...

    @abstractmethod
    def _tell(self, candidates: np.ndarray, losses: np.ndarray, *gradients: np.ndarray) -> None:
        """Gets `gradients` as a third argument only when the class `uses_gradients`."""

    @abstractmethod
    def _stop(self) -> bool: ...

    def _compute_context(self) -> ContextManager[None]:
        if self._rng_sandbox is None:
            return pinned_blas()
        return _both(pinned_blas(), self._rng_sandbox)

    # ---------------------------------------------------------------------- public API

    def ask(self) -> np.ndarray:
        if self._pending is None:
            with self._compute_context():
                candidates = np.array(self._ask(), dtype=np.float64, order="C")
            if candidates.shape != (self.popsize, self.dim):
                raise RuntimeError(
                    f"{self.name}: produced candidates of shape {candidates.shape}, "
                    f"expected {(self.popsize, self.dim)}"
                )
            self._pending = candidates
        # A copy, so a caller scribbling on its array cannot change what tell() checks against.
        return self._pending.copy()

    def tell(self, candidates: np.ndarray, losses: np.ndarray, gradients: np.ndarray | None = None) -> None:
        if self._pending is None:
            raise ValueError(f"{self.name}: tell() called without a pending ask()")
        candidates = np.asarray(candidates)
        if candidates.shape != self._pending.shape:
            raise ValueError(
                f"{self.name}: tell() got candidates of shape {candidates.shape}, "
                f"the pending ask() has shape {self._pending.shape}"
            )
        if not np.array_equal(candidates, self._pending):
            raise ValueError(
                f"{self.name}: tell() must get the candidates returned by the last ask() "
                "(same rows, same order)"
            )
        try:
            losses = np.asarray(losses, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.name}: losses must be numbers: {exc}") from None
        if losses.shape != (self.popsize,):
            raise ValueError(f"{self.name}: losses must have shape ({self.popsize},), got {losses.shape}")
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            raise ValueError(
                f"{self.name}: non-finite losses at positions {bad.tolist()} "
                f"({losses[bad].tolist()}); score failed candidates with a finite penalty instead"
            )
        if self.uses_gradients:
            extra = (self._checked_gradients(gradients),)
        elif gradients is None:
            extra = ()
        else:
            raise ValueError(f"{self.name}: is gradient-free; tell() takes no gradients")
        candidates = self._pending  # the exact asked array, not the caller's copy
        with self._compute_context():
            self._tell(candidates, losses, *extra)
        i = int(np.argmin(losses))
        if losses[i] < self._best_loss:
            self._best_loss = float(losses[i])
            self._best_x = candidates[i].copy()
        self._pending = None
        self.generation += 1

    def _checked_gradients(self, gradients: np.ndarray | None) -> np.ndarray:
        if gradients is None:
            raise ValueError(f"{self.name}: needs the gradients of the losses: tell(candidates, losses, gradients)")
        gradients = np.asarray(gradients, dtype=np.float64)
        if gradients.shape != self._pending.shape:
            raise ValueError(f"{self.name}: gradients must have shape {self._pending.shape}, got {gradients.shape}")
        if not np.all(np.isfinite(gradients)):
            raise ValueError(f"{self.name}: non-finite gradients")
        return gradients

    def stop(self) -> bool:
        with self._compute_context():
            return bool(self._stop())

    @property
    def best(self) -> tuple[np.ndarray, float]:
        """Lowest-loss candidate told so far (a copy) and its loss.

        Before the first tell this is the starting point z = 0 with loss ``inf``: the
        unmodified prompt is the right fallback, and raising here would also break
        ``isinstance(opt, Optimizer)`` (Python < 3.12 probes the property).
        """
        if self._best_x is None:
            return np.zeros(self.dim), math.inf
        return self._best_x.copy(), self._best_loss

    @property
    def active_block(self) -> int | None:
        """The block of z the pending (or next) ask changes, for optimizers that search z
        in blocks (divide and conquer); None: every ask changes all of z."""
        return None

    def state_dict(self) -> bytes:
        payload = {
            "format": _STATE_FORMAT,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "config": self._config(),
            "state": self.__dict__,
        }
        return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)

    def load_state_dict(self, state: bytes) -> None:
        payload = pickle.loads(state)
        if not isinstance(payload, dict) or payload.get("format") != _STATE_FORMAT:
            raise ValueError(f"{self.name}: not an optimizer state (or an unsupported format)")
        mine = f"{type(self).__module__}.{type(self).__qualname__}"
        if payload["class"] != mine:
            raise ValueError(f"{self.name}: state was saved by {payload['class']}, not {mine}")
        config = self._config()
        differing = [k for k in config if not same(config[k], payload["config"].get(k))]
        if differing:
            detail = ", ".join(f"{k}: saved {payload['config'].get(k)!r} vs {config[k]!r}" for k in differing)
            raise ValueError(
                f"{self.name}: state was saved by an optimizer made with different arguments ({detail}); "
                "make the optimizer with the arguments of the saved run before loading"
            )
        self.__dict__.clear()
        self.__dict__.update(payload["state"])

    def _config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "popsize": self.popsize,
            "seed": self.seed,
            "sigma0": self.sigma0,
            "bounds": self.bounds,
            "options": self.options,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, popsize={self.popsize}, "
            f"seed={self.seed}, generation={self.generation})"
        )


@contextmanager
def _both(first: ContextManager[Any], second: ContextManager[Any]) -> Iterator[None]:
    with first, second:
        yield

