"""Validating what an optimizer is built with: option keys, numbers, bounds, and
comparing the arguments a saved state was made with."""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Mapping

import numpy as np


def check_option_keys(optimizer: str, options: Mapping[str, Any], allowed: list[str] | set[str]) -> None:
    """Reject unknown option keys: a misspelt option silently ignored wastes a whole run."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(allowed), n=2)
            if close:
                hints.append(f"{key!r} -> {' or '.join(map(repr, close))}?")
        hint = f" (did you mean: {'; '.join(hints)})" if hints else ""
        raise ValueError(
            f"unknown option(s) {unknown} for optimizer {optimizer!r}{hint}; "
            f"allowed options: {', '.join(sorted(allowed)) or 'none'}"
        )


def check_int(what: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{what} must be >= {minimum}{upper}, got {value}")
    return value


def check_positive_float(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be finite and > 0, got {value}")
    return value


def check_bounds(bounds: Any) -> tuple[float, float] | None:
    if bounds is None:
        return None
    try:
        lower, upper = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be a pair (lower, upper) of numbers, got {bounds!r}") from None
    if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
        raise ValueError(f"bounds must be finite with lower < upper, got {bounds!r}")
    if not lower <= 0.0 <= upper:
        # Every optimizer starts at z = 0 (the initial prompt); it has to be feasible.
        raise ValueError(f"bounds must contain 0 (the starting point), got {bounds!r}")
    return (lower, upper)


def same(a: Any, b: Any) -> bool:
    """Structural equality that copes with numpy arrays and NaN inside option dicts."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:
        return False
