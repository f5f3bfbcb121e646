"""Statistics of an intrinsic-dimension sweep (Li et al. 2018; Aghajanyan et al. 2021).

A sweep tunes the same task in random subspaces of several sizes d, with several seeds,
and records the test accuracy of each (d, seed) run. The *mean curve* is the accuracy
averaged over seeds at each d. Given a reference accuracy (e.g. the full delta tuned
with gradients), the *threshold* is ``fraction * reference`` (fraction 0.9 by default)
and *d90* is the smallest d whose mean accuracy reaches it:

* the first measured d with mean >= threshold counts, even if the curve dips below the
  threshold again at a larger d (the curves are noisy; the first crossing is the
  definition of Li et al.);
* between the last d below the threshold and that d, d90 is interpolated linearly in
  log d, since the dims are spaced geometrically and accuracy is roughly linear in log d;
* if the smallest measured d already reaches it, d90 is that d: nothing locates it lower;
* if no d reaches it, d90 is None ("not reached").

Its uncertainty is a percentile bootstrap over seeds: a seed is the unit, because the
runs of one seed across d share its data split and so are correlated.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from blackbox.report import pyplot

MAX_DIMS = 64
_FORMS = "accepted: a comma list of positive ints '4,8,16', a range 'START:STOP:xFACTOR' ('8:1024:x2'), or a mix"
# A range walks one step per factor: this bounds the walk for factors barely above 1.
_MAX_STEPS = 10_000


def _bad(piece: str, why: str) -> ValueError:
    return ValueError(f"--dims: {piece!r} {why}; {_FORMS}")


def _positive_int(text: str, piece: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad(piece, f"has {text!r}, which is not an integer") from None
    if value <= 0:
        raise _bad(piece, "is not positive")
    return value


def _geometric(piece: str) -> list[int]:
    parts = piece.split(":")
    if len(parts) != 3 or not parts[2].startswith("x"):
        raise _bad(piece, "is not a range START:STOP:xFACTOR")
    start, stop = (_positive_int(p.strip(), piece) for p in parts[:2])
    try:
        factor = float(parts[2][1:])
    except ValueError:
        raise _bad(piece, "has a factor that is not a number") from None
    if not math.isfinite(factor) or factor <= 1:
        raise _bad(piece, "needs a factor > 1")
    if stop < start:
        raise _bad(piece, "has STOP below START")
    if math.log(stop / start) / math.log(factor) > _MAX_STEPS:
        raise _bad(piece, f"takes more than {_MAX_STEPS} steps")
    values, value = [], float(start)
    while value <= stop * (1 + 1e-12):  # 8:64:x2 must end on 64 despite float drift
        values.append(int(math.floor(value + 0.5)))
        value *= factor
    return values


def parse_dims(text: str) -> list[int]:
    """The subspace sizes of ``--dims``: sorted distinct positive ints (see `_FORMS`)."""
    dims: set[int] = set()
    for raw in text.split(","):
        piece = raw.strip()
        if not piece:
            raise _bad(text, "has an empty item")
        dims.update(_geometric(piece) if ":" in piece else [_positive_int(piece, piece)])
    if len(dims) > MAX_DIMS:
        raise _bad(text, f"gives {len(dims)} values, more than {MAX_DIMS}")
    return sorted(dims)


def _valid(rows: Iterable[Mapping[str, Any]]) -> list[tuple[int, int, float]]:
    return [(int(r["d"]), int(r["seed"]), float(r["test_acc"])) for r in rows
            if r.get("test_acc") is not None and r.get("test_acc") != ""]


def mean_curve(rows: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dims, mean, sample std, count) per d over the rows that have a test accuracy."""
    by_d: dict[int, list[float]] = {}
    for d, _, acc in _valid(rows):
        by_d.setdefault(d, []).append(acc)
    dims = sorted(by_d)
    values = [np.asarray(by_d[d]) for d in dims]
    return (np.asarray(dims, dtype=int),
            np.asarray([v.mean() for v in values], dtype=float),
            np.asarray([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values], dtype=float),
            np.asarray([len(v) for v in values], dtype=int))


def _d90_batch(dims: np.ndarray, means: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """d90 of each row of ``means`` (resamples x dims); +inf where not reached."""
    reached = means >= thresholds[:, None]
    first = reached.argmax(axis=1)
    rows = np.arange(len(means))
    prev = np.maximum(first - 1, 0)
    lo, hi = means[rows, prev], means[rows, first]
    # Where first == 0 the share is 0/0; there, and where the mean touches the threshold,
    # the measured d itself is returned, exactly rather than through exp(log d).
    with np.errstate(invalid="ignore", divide="ignore"):
        share = (thresholds - lo) / (hi - lo)
        log_d = np.log(dims[prev]) + share * (np.log(dims[first]) - np.log(dims[prev]))
    on_point = (first == 0) | (share >= 1)
    value = np.where(on_point, dims[first], np.exp(np.where(on_point, 0.0, log_d)))
    return np.where(reached.any(axis=1), value, np.inf)


def _check_threshold(caller: str, reference: float, fraction: float) -> None:
    if not reference > 0:
        raise ValueError(f"{caller}: reference must be > 0, got {reference}")
    if not 0 < fraction <= 1:
        raise ValueError(f"{caller}: fraction must be in (0, 1], got {fraction}")


def d90(dims: Sequence[float], means: Sequence[float], reference: float, fraction: float = 0.9) -> float | None:
    """The smallest d (log-interpolated) whose mean reaches fraction * reference; None if none."""
    dims_a, means_a = np.asarray(dims, dtype=float), np.asarray(means, dtype=float)
    if dims_a.ndim != 1 or dims_a.shape != means_a.shape:
        raise ValueError(f"d90: dims and means differ in length ({dims_a.size} vs {means_a.size})")
    if dims_a.size == 0:
        raise ValueError("d90: no measured d")
    if np.any(dims_a <= 0) or np.any(np.diff(dims_a) <= 0):
        raise ValueError("d90: dims must be positive and strictly increasing")
    if not np.isfinite(means_a).all():
        raise ValueError("d90: means must be finite")
    _check_threshold("d90", reference, fraction)
    value = _d90_batch(dims_a, means_a[None, :], np.array([fraction * reference]))[0]
    return float(value) if math.isfinite(value) else None


def _quantile(sorted_values: np.ndarray, q: float) -> float:
    # np.quantile interpolates inf against a finite neighbour into nan; a not-reached
    # resample must instead push the bound to inf only when the quantile really lands on it.
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    if high == low:
        return float(sorted_values[low])
    if not math.isfinite(sorted_values[high]):
        return math.inf
    return float(sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low]))


def bootstrap_d90(rows: Iterable[Mapping[str, Any]], reference: float, fraction: float = 0.9,
                  resamples: int = 2000, level: float = 0.95, seed: int = 0,
                  reference_rows: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Percentile interval of d90 over resampled seeds; None bounds mean "not reached".

    With ``reference_rows`` the reference is the mean over the resampled seeds' reference
    runs (seeds of the sweep without one leave it out); a resample that drew none of
    them falls back to ``reference``.
    """
    _check_threshold("bootstrap_d90", reference, fraction)
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"bootstrap_d90: need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    valid = _valid(rows)
    if not valid:
        raise ValueError("bootstrap_d90: no run with a test accuracy")
    dims = sorted({d for d, _, _ in valid})
    seeds = sorted({s for _, s, _ in valid})
    d_at, s_at = {d: i for i, d in enumerate(dims)}, {s: i for i, s in enumerate(seeds)}
    # Per seed and d, a sum and a count: a seed drawn k times then weighs its runs k times.
    sums, counts = np.zeros((len(seeds), len(dims))), np.zeros((len(seeds), len(dims)))
    for d, s, acc in valid:
        sums[s_at[s], d_at[d]] += acc
        counts[s_at[s], d_at[d]] += 1
    ref_sums, ref_counts = np.zeros(len(seeds)), np.zeros(len(seeds))
    for s, acc in ((int(r["seed"]), r.get("test_acc")) for r in reference_rows or ()):
        if s in s_at and acc is not None and acc != "":
            ref_sums[s_at[s]] += float(acc)
            ref_counts[s_at[s]] += 1
    ref_means = np.divide(ref_sums, ref_counts, out=np.zeros(len(seeds)), where=ref_counts > 0)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
    weights = np.zeros((resamples, len(seeds)))
    np.add.at(weights, (np.arange(resamples)[:, None], draws), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (weights @ sums) / (weights @ counts)  # nan where a d got no run
        drawn_refs = weights @ (ref_counts > 0)
        refs = np.where(drawn_refs > 0, (weights @ ref_means) / drawn_refs, reference)
    thresholds = fraction * refs
    dims_a = np.asarray(dims, dtype=float)
    complete = ~np.isnan(means).any(axis=1)
    values = np.full(resamples, np.inf)
    values[complete] = _d90_batch(dims_a, means[complete], thresholds[complete])
    for i in np.flatnonzero(~complete):  # rare: the drawn seeds miss a d, which drops out
        keep = ~np.isnan(means[i])
        values[i] = _d90_batch(dims_a[keep], means[i, keep][None, :], thresholds[i:i + 1])[0]

    ordered = np.sort(values)
    tail = (1 - level) / 2
    bounds = [_quantile(ordered, tail), _quantile(ordered, 1 - tail)]
    return {"interval": [b if math.isfinite(b) else None for b in bounds], "level": level,
            "resamples": resamples, "reached_fraction": float(np.isfinite(values).mean())}


def plot_sweep(dims: Sequence[int], means: Sequence[float], stds: Sequence[float], reference: float,
               d90_value: float | None, interval: Sequence[float | None] | None,
               path: str | os.PathLike, fraction: float = 0.9, title: str = "") -> Path:
    """accuracy_vs_d.png: the mean curve (in %) with the threshold, reference and d90."""
    plt = pyplot()
    dims_a = np.asarray(dims, dtype=float)
    figure, axis = plt.subplots(figsize=(7, 4.2))
    axis.errorbar(dims_a, 100 * np.asarray(means), yerr=100 * np.asarray(stds), fmt="o-", capsize=3,
                  label="mean ± std over seeds")
    axis.set_xscale("log")
    left, right = dims_a.min() / 1.4, dims_a.max() * 1.4
    axis.set_xlim(left, right)  # fixed before drawing spans that run to the right edge
    axis.set_xticks(dims_a, [str(int(d)) for d in dims_a])
    axis.minorticks_off()
    threshold = 100 * fraction * reference
    axis.axhline(threshold, linestyle="--", color="gray", label=f"{100 * fraction:g}% of reference ({threshold:.1f})")
    axis.axhline(100 * reference, linestyle=":", color="black", label=f"reference ({100 * reference:.1f})")
    if d90_value is not None:
        axis.axvline(d90_value, color="tab:red", label=f"d{100 * fraction:g} ≈ {d90_value:.0f}")
        if interval is not None and interval[0] is not None:
            high = interval[1] if interval[1] is not None else right
            axis.axvspan(interval[0], high, color="tab:red", alpha=0.15, label="bootstrap interval")
    axis.set_xlabel("subspace dimension d")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(title or "accuracy vs subspace dimension")
    axis.legend(fontsize="small")
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
