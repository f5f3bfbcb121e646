"""White-box baseline: Adam or SGD on z with the backbone's exact gradients.

Not a black-box method: it needs a server started with ``--allow-gradients``. It is here
so that a comparison can show how far the forward-only optimizers are from first-order
descent on the same z, delta and budget. With the ``identity`` projection z *is* the
whole delta (every prompt coordinate), which gives the "no projection" comparison.

One generation is one step: ``ask()`` returns the current point (popsize is always 1,
whatever is requested) and ``tell()`` takes its loss and its gradient. Each step is one
gradient call on the train split, counted as one API call; a gradient call costs about
three forwards of compute (forward, and a backward of twice its cost).

Options: ``method`` "adam" (default) or "sgd"; ``lr`` (default ``0.1 * sigma0``: Adam's
steps are about ``lr`` per coordinate, so this matches the search scale of z);
``betas`` and ``eps`` (Adam); ``momentum`` (SGD, heavy ball); ``weight_decay`` (L2 on z,
both). With bounds, z is clipped into the box after every step. stop() is True once z
has become non-finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import BaseOptimizer, register_optimizer
from .checks import check_positive_float

METHODS = ("adam", "sgd")


@register_optimizer("gradient")
class GradientDescent(BaseOptimizer):
    uses_gradients = True
    fixed_popsize = 1
    option_defaults = {"method": "adam", "lr": None, "betas": (0.9, 0.999), "eps": 1e-8, "momentum": 0.0,
                       "weight_decay": 0.0}
    option_help = {"method": "adam or sgd", "lr": "step size (None: 0.1 x --sigma)", "betas": "Adam's (beta1, beta2)",
                   "eps": "Adam's denominator guard", "momentum": "SGD's heavy-ball momentum",
                   "weight_decay": "L2 on z"}

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super()._resolve_options(options)
        if options["method"] not in METHODS:
            raise ValueError(f"gradient option 'method' must be one of {', '.join(METHODS)}, got {options['method']!r}")
        lr = options["lr"]
        options["lr"] = check_positive_float("gradient option 'lr'", 0.1 * self.sigma0 if lr is None else lr)
        options["eps"] = check_positive_float("gradient option 'eps'", options["eps"])
        beta1, beta2 = (float(b) for b in options["betas"])
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"gradient option 'betas' must both be in [0, 1), got {options['betas']!r}")
        options["betas"] = (beta1, beta2)
        for name in ("momentum", "weight_decay"):
            value = float(options[name])
            if not (np.isfinite(value) and value >= 0.0) or (name == "momentum" and value >= 1.0):
                raise ValueError(f"gradient option {name!r} must be finite, >= 0 (momentum < 1), got {value}")
            options[name] = value
        return options

    def _setup(self) -> None:
        self.x = np.zeros(self.dim)
        self._first_moment = np.zeros(self.dim)  # Adam's m, or SGD's velocity
        self._second_moment = np.zeros(self.dim)

    def _ask(self) -> np.ndarray:
        return self.x[None, :].copy()

    def _tell(self, candidates: np.ndarray, losses: np.ndarray, gradients: np.ndarray) -> None:
        options = self.options
        grad = gradients[0] + options["weight_decay"] * self.x
        if options["method"] == "adam":
            beta1, beta2 = options["betas"]
            step = self.generation + 1
            self._first_moment = beta1 * self._first_moment + (1 - beta1) * grad
            self._second_moment = beta2 * self._second_moment + (1 - beta2) * grad**2
            m_hat = self._first_moment / (1 - beta1**step)
            v_hat = self._second_moment / (1 - beta2**step)
            update = m_hat / (np.sqrt(v_hat) + options["eps"])
        else:
            self._first_moment = options["momentum"] * self._first_moment + grad
            update = self._first_moment
        self.x = self.x - options["lr"] * update
        if self.bounds is not None:
            np.clip(self.x, self.bounds[0], self.bounds[1], out=self.x)

    def _stop(self) -> bool:
        return not bool(np.all(np.isfinite(self.x)))
