"""One tenant's huge population beside another's small requests: how long the small ones
wait (tenants take turns step by step, backbone_server/fairness.py).

    python scripts/bench_fairness.py [--model tiny-llama] [--big 4096] [--examples 32]

Tenant "big" sends one Evaluate of --big candidates on --examples examples; while it runs,
tenant "small" sends Evaluate calls of 4 candidates one after another. Prints the big
call's time, the small calls' latencies alone and beside the big one, and ends with one
JSON line (`small_p50_ms`, `small_p99_ms`, `small_alone_ms`, `big_s`, `small_calls`).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np

from backbone_server.server import create_server
from blackbox.client import BackboneClient, DeltaSpec
from blackbox.tasks import Example

TEMPLATE = "{text_a} It was {mask}"
WORDS = "a great film a bad film very good not good at all the story was fine and the music too".split()


def examples(count: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [Example(" ".join(rng.choice(WORDS, size=8)), None, int(rng.integers(2))) for _ in range(count)]


def client(address: str, key: str | None) -> BackboneClient:
    return BackboneClient(address) if key is None else BackboneClient(address, api_key=key)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--big", type=int, default=4096, help="candidates of the big tenant's one call")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--open", action="store_true",
                        help="an open server: both callers are one tenant (also runs on trees without tenants)")
    args = parser.parse_args(argv)
    keys = {"big": "bbx_big", "small": "bbx_small"}
    if args.open:
        keys = {"big": None, "small": None}
        running = create_server(args.model, "127.0.0.1:0", device="cpu", dtype="float32")
    else:
        from backbone_server.server import Service
        from backbone_server.tenants import Tenant, TenantDirectory
        from blackbox.v1.auth import hash_key

        tenants = TenantDirectory({hash_key(key): Tenant(name, key_sha256=hash_key(key))
                                   for name, key in keys.items()})
        running = create_server(args.model, "127.0.0.1:0", device="cpu", dtype="float32",
                                service=Service(tenants=tenants))
    running.wait_ready(timeout=300)
    delta = DeltaSpec(prompt_length=4, intrinsic_dim=8)
    try:
        with client(running.address, keys["big"]) as big, client(running.address, keys["small"]) as small:
            big_session = big.create_session({"train": examples(args.examples, 0)}, TEMPLATE, ["bad", "great"], delta)
            small_session = small.create_session({"train": examples(args.examples, 1)}, TEMPLATE, ["bad", "great"],
                                                 delta)
            rng = np.random.default_rng(0)
            small_z = rng.normal(size=(4, 8)).astype(np.float32)
            alone = []
            for _ in range(5):
                began = time.perf_counter()
                small_session.evaluate("train", small_z)
                alone.append(time.perf_counter() - began)
            big_time = []

            def run_big():
                began = time.perf_counter()
                big_session.evaluate("train", rng.normal(size=(args.big, 8)).astype(np.float32))
                big_time.append(time.perf_counter() - began)

            thread = threading.Thread(target=run_big)
            thread.start()
            time.sleep(0.2)
            beside = []
            while thread.is_alive():
                began = time.perf_counter()
                small_session.evaluate("train", small_z)
                beside.append(time.perf_counter() - began)
            thread.join()
    finally:
        running.stop(grace=0)
    result = {
        "script": "bench_fairness", "model": args.model, "tenants": "one (open)" if args.open else "two", "big_candidates": args.big, "examples": args.examples,
        "big_s": round(big_time[0], 2), "small_calls": len(beside),
        "small_alone_ms": round(float(np.median(alone)) * 1e3, 1),
        "small_p50_ms": round(float(np.percentile(beside, 50)) * 1e3, 1) if beside else None,
        "small_p99_ms": round(float(np.percentile(beside, 99)) * 1e3, 1) if beside else None,
        "small_max_ms": round(max(beside) * 1e3, 1) if beside else None,
    }
    print(f"big call: {result['big_s']} s; {len(beside)} small calls beside it: p50 {result['small_p50_ms']} ms, "
          f"p99 {result['small_p99_ms']} ms (alone {result['small_alone_ms']} ms)", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
