#!/usr/bin/env python
"""Time the projections: a population (P, d) -> (P, D), forward and forward+backward.

    python scripts/bench_projection.py [--device cpu|cuda] [--repeats N] [--json]

Cases: P=20, d=500, D in {25,600 (a 50 x 512 prompt), 1e6, 4e6}, for the dense normal,
sparse (default density 1/sqrt(d)) and Fastfood projections. Prints a markdown table
(build time, median ms per call, stored MB) and, as the last line, one JSON object with
every figure. A dense matrix that would take more than a quarter of the free memory is
skipped (at D=4e6 it is 8 GB in fp32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("backbone_server") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backbone_server.projection import make_projection  # noqa: E402

POPULATION = 20
IN_DIM = 500
OUT_DIMS = [25_600, 1_000_000, 4_000_000]
KINDS = ["normal", "sparse", "fastfood"]
STD = 0.01


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (and, for sparse, builds A^T once)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def bench(kind: str, out_dim: int, device: torch.device, repeats: int) -> dict:
    case = {"kind": kind, "P": POPULATION, "d": IN_DIM, "D": out_dim}
    if kind == "normal" and 4 * IN_DIM * out_dim > free_bytes(device) // 4:
        case["skipped"] = f"dense matrix of {4 * IN_DIM * out_dim / 2**30:.1f} GiB"
        return case
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    projection = make_projection(kind, IN_DIM, out_dim, seed=0, std=STD, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    case["build_ms"] = round(1e3 * (time.perf_counter() - start), 2)
    z = torch.randn(POPULATION, IN_DIM, generator=torch.Generator().manual_seed(0)).to(device)

    def forward():
        with torch.no_grad():
            return projection(z)

    def backward():
        leaf = z.clone().requires_grad_()
        projection(leaf).sum().backward()
        return leaf.grad

    forward_ms = timed(forward, device, repeats)
    backward_ms = timed(backward, device, repeats)
    case.update({
        "forward_median_ms": round(statistics.median(forward_ms), 3),
        "forward_min_ms": round(min(forward_ms), 3),
        "fwd_bwd_median_ms": round(statistics.median(backward_ms), 3),
        "stored_mb": round(projection.nbytes / 2**20, 2),
    })
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (default 5)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    device = torch.device(args.device)

    results = []
    for out_dim in OUT_DIMS:
        for kind in KINDS:
            print(f"... {kind} D={out_dim}", file=sys.stderr, flush=True)
            results.append(bench(kind, out_dim, device, args.repeats))
            if device.type == "cuda":
                torch.cuda.empty_cache()

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "results": results,
    }
    if not args.json:
        print(f"(P={POPULATION}, d={IN_DIM}) -> D on {report['device']} ({args.device}, "
              f"{report['torch_threads']} threads), median of {args.repeats} calls\n")
        print("| kind | D | build ms | forward ms | fwd+bwd ms | stored MB |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in results:
            if "skipped" in r:
                print(f"| {r['kind']} | {r['D']:,} | skipped: {r['skipped']} | | | |")
            else:
                print(f"| {r['kind']} | {r['D']:,} | {r['build_ms']:.1f} | {r['forward_median_ms']:.2f} "
                      f"| {r['fwd_bwd_median_ms']:.2f} | {r['stored_mb']:.1f} |")
        print()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
