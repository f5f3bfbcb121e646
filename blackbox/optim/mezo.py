"""MeZO: zeroth-order SGD with two-sided SPSA gradient estimates (Malladi et al., 2023).

Each generation draws q = popsize // 2 directions u_i ~ N(0, I) and asks the 2q points
``[x + eps*u_1, ..., x + eps*u_q, x - eps*u_1, ..., x - eps*u_q]`` (all "+" first). The
told losses give

    g = mean_i (L(x + eps*u_i) - L(x - eps*u_i)) / (2*eps) * u_i

and an SGD step ``x <- x - lr * (g + weight_decay*x)`` (heavy-ball momentum optional).
The directions come from ``np.random.default_rng([seed, generation])`` and are
regenerated in tell() rather than stored -- MeZO's memory trick, and it keeps the
checkpoint small. Each +/- evaluation is one API call (BBT's counting), hence
``calls_per_candidate = 1``.

Defaults: ``lr=3`` (``DEFAULT_LR``), ``eps=1e-3*sigma0`` (sigma0 is the search scale of
z), ``lr_decay=0`` (generation t steps with ``lr / (1 + lr_decay*t)``),
``weight_decay=0``, ``momentum=0``. The learning rate is not rescaled by sigma0: the
gradient of a loss wrt z scales as 1/scale, so no single rule fits every loss. The
default is measured on the losses this tool tunes (the BBT projection makes one unit of
z about one embedding's spread), where gradients are ~0.04 per unit; tune it elsewhere.
With bounds, x and the asked points are clipped into the box (this biases the estimate
near the walls). stop() is True only once x has become non-finite (lr far too large).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import BaseOptimizer, register_optimizer
from .checks import check_positive_float


# Measured on SST-2 with the bundled model (docs/performance.md): the train loss's
# gradient is ~0.04 per unit of z, so lr 1e-2 left it flat, lr 100 diverged.
DEFAULT_LR = 3.0


@register_optimizer("mezo")
class MeZO(BaseOptimizer):
    option_defaults = {"lr": DEFAULT_LR, "eps": None, "lr_decay": 0.0, "weight_decay": 0.0, "momentum": 0.0}
    option_help = {"lr": "SGD step on z",
                   "eps": "perturbation size (None: 1e-3 x --sigma)",
                   "lr_decay": "schedule: generation t steps with lr / (1 + lr_decay * t); 0 keeps lr constant",
                   "weight_decay": "L2 on z", "momentum": "heavy-ball momentum, in [0, 1)"}
    min_popsize = 2

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super()._resolve_options(options)
        if self.popsize % 2:
            raise ValueError(f"mezo needs an even popsize (pairs of +/- evaluations), got {self.popsize}")
        options["lr"] = check_positive_float("mezo option 'lr'", options["lr"])
        eps = options["eps"]
        options["eps"] = check_positive_float("mezo option 'eps'", 1e-3 * self.sigma0 if eps is None else eps)
        wd = float(options["weight_decay"])
        if not wd >= 0.0 or not np.isfinite(wd):
            raise ValueError(f"mezo option 'weight_decay' must be finite and >= 0, got {wd}")
        mom = float(options["momentum"])
        if not 0.0 <= mom < 1.0:
            raise ValueError(f"mezo option 'momentum' must be in [0, 1), got {mom}")
        options["weight_decay"], options["momentum"] = wd, mom
        decay = float(options["lr_decay"])
        if not decay >= 0.0 or not np.isfinite(decay):
            raise ValueError(f"mezo option 'lr_decay' must be finite and >= 0, got {options['lr_decay']!r}")
        options["lr_decay"] = decay
        return options

    def _setup(self) -> None:
        self.x = np.zeros(self.dim)
        self._velocity = np.zeros(self.dim)

    def _directions(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.generation])
        return rng.standard_normal((self.popsize // 2, self.dim))

    def _clip(self, a: np.ndarray) -> np.ndarray:
        if self.bounds is not None:
            np.clip(a, self.bounds[0], self.bounds[1], out=a)
        return a

    def _ask(self) -> np.ndarray:
        step = self.options["eps"] * self._directions()
        return self._clip(np.concatenate([self.x + step, self.x - step]))

    def _tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        q = self.popsize // 2
        eps = self.options["eps"]
        lr = self.options["lr"] / (1.0 + self.options["lr_decay"] * self.generation)
        projected = (losses[:q] - losses[q:]) / (2.0 * eps)
        grad = projected @ self._directions() / q
        if self.options["weight_decay"]:
            grad = grad + self.options["weight_decay"] * self.x
        if self.options["momentum"]:
            self._velocity = self.options["momentum"] * self._velocity + grad
            grad = self._velocity
        self.x = self._clip(self.x - lr * grad)

    def _stop(self) -> bool:
        return not bool(np.all(np.isfinite(self.x)))
