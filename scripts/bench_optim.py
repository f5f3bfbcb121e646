#!/usr/bin/env python
"""Time the optimizers' own cost: ask() + tell() per generation, objective excluded.

    python scripts/bench_optim.py [--generations N] [--warmup W] [--json]

Prints a markdown table (median and p90 of ask+tell per generation, in ms) and, as the
last line, one JSON object with every figure. With --json only the JSON line is printed.
The objective is a random diagonal quadratic; its evaluation is not timed. Full CMA-ES
at d=5000 is skipped (a 5000x5000 covariance, O(d^2) per sample and an O(d^3)
eigendecomposition): use sep-cma there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

if importlib.util.find_spec("blackbox") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from blackbox.optim import make_optimizer  # noqa: E402

POPSIZE = 20
CASES = [
    ("cma", 500),
    ("sep-cma", 500),
    ("ng:NGOpt", 500),
    ("ng:TwoPointsDE", 500),
    ("ng:OnePlusOne", 500),
    ("mezo", 500),
    ("gradient", 500),
    ("sep-cma", 5000),
    ("ng:TwoPointsDE", 5000),
    ("ng:OnePlusOne", 5000),
    ("mezo", 5000),
    ("gradient", 5000),
]
SKIPPED = [("cma", 5000, "full covariance: 200 MB matrix, O(d^3) eigendecomposition; use sep-cma")]


def bench(name: str, dim: int, generations: int, warmup: int) -> dict:
    rng = np.random.default_rng(dim)
    weights = rng.uniform(0.1, 10.0, dim)
    center = rng.normal(0.0, 0.5, dim)

    def objective(z: np.ndarray) -> np.ndarray:
        return ((z - center) ** 2) @ weights

    def gradient(z: np.ndarray) -> np.ndarray:
        return 2.0 * (z - center) * weights

    options = {"budget": POPSIZE * (warmup + generations)} if name == "ng:NGOpt" else None
    try:
        opt = make_optimizer(name, dim, POPSIZE, seed=0, sigma0=0.5, options=options)
    except ValueError as exc:  # e.g. a nevergrad configuration known to crash
        return {"optimizer": name, "d": dim, "popsize": POPSIZE, "refused": str(exc)}
    ask_ms, tell_ms = [], []
    for gen in range(warmup + generations):
        t0 = time.perf_counter()
        z = opt.ask()
        t1 = time.perf_counter()
        losses = objective(z)
        t2 = time.perf_counter()
        if opt.uses_gradients:  # the white-box baseline: one point and its gradient
            opt.tell(z, losses, gradient(z))
        else:
            opt.tell(z, losses)
        t3 = time.perf_counter()
        if gen >= warmup:
            ask_ms.append(1e3 * (t1 - t0))
            tell_ms.append(1e3 * (t3 - t2))
    total = np.add(ask_ms, tell_ms)
    result = {
        "optimizer": name,
        "d": dim,
        "popsize": opt.popsize,
        "median_ms": round(float(np.median(total)), 3),
        "p90_ms": round(float(np.percentile(total, 90)), 3),
        "ask_median_ms": round(float(np.median(ask_ms)), 3),
        "tell_median_ms": round(float(np.median(tell_ms)), 3),
        "best_loss_over_f0": round(float(opt.best[1] / objective(np.zeros((1, dim)))[0]), 4),
    }
    inner = getattr(getattr(opt, "ng_optimizer", None), "_optim", None)
    if inner is not None:  # what NGOpt picked for this budget
        result["selected"] = getattr(inner, "name", type(inner).__name__)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=50, help="timed generations per case (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed generations first (default 5)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    if args.generations < 1 or args.warmup < 0:
        parser.error("--generations must be >= 1 and --warmup >= 0")
    warnings.simplefilter("ignore")  # nevergrad's advice on settings; irrelevant to timing

    results = []
    for name, dim in CASES:
        print(f"... {name} d={dim}", file=sys.stderr, flush=True)
        results.append(bench(name, dim, args.generations, args.warmup))

    report = {
        "generations": args.generations,
        "warmup": args.warmup,
        "popsize": POPSIZE,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "results": results,
        "skipped": [{"optimizer": n, "d": d, "reason": why} for n, d, why in SKIPPED],
    }
    if not args.json:
        print(f"ask+tell per generation, popsize {POPSIZE}, {args.generations} generations "
              f"after {args.warmup} warm-up, {os.cpu_count()} CPUs, BLAS pinned to 1 thread\n")
        print("| optimizer | d | popsize | median ms | p90 ms |")
        print("|---|---:|---:|---:|---:|")
        notes = []
        for r in results:
            label = r["optimizer"] + (f" ({r['selected']})" if "selected" in r else "")
            if "refused" in r:
                notes.append(f"{r['optimizer']} d={r['d']}: {r['refused']}")
                print(f"| {label} | {r['d']} | {r['popsize']} | refused [{len(notes)}] | |")
            else:
                print(f"| {label} | {r['d']} | {r['popsize']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |")
        for n, d, why in SKIPPED:
            notes.append(f"{n} d={d}: skipped: {why}")
            print(f"| {n} | {d} | {POPSIZE} | skipped [{len(notes)}] | |")
        print()
        for i, note in enumerate(notes, start=1):
            print(f"[{i}] {note}")
        print()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
