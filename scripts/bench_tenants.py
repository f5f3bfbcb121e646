"""Many tenants on one server: throughput with the in-batch scheduler on and off, in one run.

    python scripts/bench_tenants.py --model tiny-llama --tenants 8 --popsize 4 --seconds 20
    python scripts/bench_tenants.py --model tiny-llama --tenants 8 --popsize 4 --seconds 20 --workload generate

N tenants (each with its own key, session and texts) send tuning-shaped requests: an
Evaluate of a population of --popsize soft prompts on their 16 train examples, again and
again, as a tuner's generations do; one more tenant sends Predict calls of 32 texts under
a stored delta. With `--workload generate` each tenant instead sends Generate calls of
--popsize texts and --max-new-tokens greedy tokens under a stored delta of its own (its
own z), and the Predict tenant still runs beside them.

The same streams run twice against servers on the same loaded model: with the
scheduler's window (--window-ms) and with it off (0), each phase in --rounds stretches
taking turns with the other's, so that a shared machine's drifting speed slows both
alike. Prints, per phase, calls/s (for
Evaluate, generations/s), rows per forward, and latency p50/p99 per tenant, and ends with
one JSON line holding `merged_vs_serial` (throughput on / off), `rows_per_forward` and
`p99_ms` (of the merged phase), and `p99_over_mean_max` (the worst tenant's p99 over the
mean latency).

What merges (`--delta`): soft prompts, behind nothing or behind their shared prefix
states; the row-local weight kinds (lora, bias, adapter) and deep prompts, each on its own
rows; prefixes, each row segment over its own virtual keys and values. Mixes run alone.
Generate's token steps merge for every kind but mixes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import numpy as np

from backbone_server.models import load_backbone
from backbone_server.server import Service, create_server
from backbone_server.tenants import Tenant, TenantDirectory
from blackbox.client import BackboneClient, DeltaSpec, SavedDelta
from blackbox.tasks import Example
from blackbox.v1.auth import hash_key

WORDS = "a great film a bad film very good not good at all the story was fine and the music too dull".split()
TEMPLATE = "{prompt} {text_a} It was {mask}"
VERBALIZER = ("bad", "great")


def texts(count: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [Example(" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))), None, int(rng.integers(2)))
            for _ in range(count)]


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 1) if values else None


def phase(backbone, args, window_ms: float, seconds: float) -> dict:
    """One stretch of the streams against a fresh server: what it measured, raw."""
    keys = {f"t{i}": f"bbx_t{i}" for i in range(args.tenants + 1)}
    directory = TenantDirectory({hash_key(k): Tenant(n, key_sha256=hash_key(k)) for n, k in keys.items()})
    running = create_server(args.model, "127.0.0.1:0", backbone=backbone,
                            service=Service(tenants=directory, batch_window_ms=window_ms, allow_logits=True,
                                            merge_max_tokens=args.merge_max_tokens))
    running.wait_ready(timeout=300)
    takes_prompt = any(part in ("prompt", "prefix", "deep-prompt") for part in args.delta.split(":")[-1].split("+"))
    delta = DeltaSpec(kind=args.delta, prompt_length=args.prompt_length if takes_prompt else 0, intrinsic_dim=args.dim)
    latencies: dict[str, list[float]] = {name: [] for name in keys}
    stop = threading.Event()
    start = threading.Barrier(len(keys) + 1)

    def tune(name: str, seed: int) -> None:
        with BackboneClient(running.address, api_key=keys[name]) as client:
            session = client.create_session({"train": texts(16, seed)}, TEMPLATE, VERBALIZER, delta)
            rng = np.random.default_rng(seed)
            start.wait()
            while not stop.is_set():
                z = rng.normal(size=(args.popsize, args.dim)).astype(np.float32)
                began = time.perf_counter()
                session.evaluate("train", z)
                latencies[name].append(time.perf_counter() - began)
            session.close()

    def predict(name: str) -> None:
        with BackboneClient(running.address, api_key=keys[name]) as client:
            client.save_delta(SavedDelta("bench", delta, TEMPLATE, VERBALIZER, np.zeros(args.dim, np.float32)),
                              overwrite=True)
            batch = [(e.text_a, None) for e in texts(32, 99)]
            start.wait()
            while not stop.is_set():
                began = time.perf_counter()
                client.predict(batch, name="bench")
                latencies[name].append(time.perf_counter() - began)

    def generate(name: str, seed: int) -> None:
        with BackboneClient(running.address, api_key=keys[name]) as client:
            z = np.random.default_rng(seed).normal(size=args.dim).astype(np.float32)
            client.save_delta(SavedDelta("own", delta, TEMPLATE, VERBALIZER, z), overwrite=True)
            batch = [(e.text_a, None) for e in texts(args.popsize, seed)]
            start.wait()
            while not stop.is_set():
                began = time.perf_counter()
                client.generate(batch, name="own", max_new_tokens=args.max_new_tokens)
                latencies[name].append(time.perf_counter() - began)

    names = list(keys)
    stream = tune if args.workload == "evaluate" else generate
    threads = [threading.Thread(target=stream, args=(name, i)) for i, name in enumerate(names[:-1])]
    threads.append(threading.Thread(target=predict, args=(names[-1],)))
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    engine = running.servicer.engine
    running.stop(grace=0)
    return {"latencies": latencies, "elapsed": elapsed, "forwards": engine.scorer.forwards,
            "rows_run": engine.scorer.rows_run, "merged_chunks": engine.merger.merged_chunks,
            "merged_by_path": dict(engine.merger.merged_by_path)}


def summary(stretches: list[dict], args, window_ms: float) -> dict:
    """A phase's stretches (its rounds) taken together."""
    names = list(stretches[0]["latencies"])
    latencies = {name: [s for stretch in stretches for s in stretch["latencies"][name]] for name in names}
    elapsed = sum(stretch["elapsed"] for stretch in stretches)
    forwards = sum(stretch["forwards"] for stretch in stretches)
    tuning = [s for name in names[:-1] for s in latencies[name]]
    mean = statistics.fmean(tuning) if tuning else 0.0
    per_tenant = {name: {"calls": len(latencies[name]), "p50_ms": percentile_ms(latencies[name], 50),
                         "p99_ms": percentile_ms(latencies[name], 99)} for name in names}
    by_path: dict[str, int] = {}
    for stretch in stretches:
        for path, count in stretch["merged_by_path"].items():
            by_path[path] = by_path.get(path, 0) + count
    result = {
        "window_ms": window_ms, "seconds": round(elapsed, 2), "rounds": len(stretches),
        "generations_per_s": round(len(tuning) / elapsed, 2),  # tenants' calls: Evaluate or Generate
        "new_tokens_per_s": round(len(tuning) * args.popsize * args.max_new_tokens / elapsed, 1)
        if args.workload == "generate" else None,
        "predicts_per_s": round(len(latencies[names[-1]]) / elapsed, 2),
        "rows_per_forward": round(sum(stretch["rows_run"] for stretch in stretches) / forwards, 1) if forwards else 0.0,
        "merged_chunks": sum(stretch["merged_chunks"] for stretch in stretches), "merged_by_path": by_path,
        "p50_ms": percentile_ms(tuning, 50), "p99_ms": percentile_ms(tuning, 99),
        "p99_over_mean_max": round(max(per_tenant[n]["p99_ms"] for n in names[:-1]) / (mean * 1e3), 2)
        if mean else None,
        "per_tenant": per_tenant,
    }
    unit = "generations/s" if args.workload == "evaluate" else "Generate calls/s"
    print(f"window {window_ms:g} ms: {result['generations_per_s']} {unit}, {result['predicts_per_s']} "
          f"predicts/s, {result['rows_per_forward']} rows per forward, p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms", file=sys.stderr)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--popsize", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase (all its rounds)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="each phase runs in this many stretches, the two phases taking turns (on, off, off, on, "
                             "...), so that a machine whose speed drifts slows both alike")
    parser.add_argument("--merge-max-tokens", type=int, default=None,
                        help="the server's merge bound (default: its own, 1024 on a CPU; 0: the memory bound)")
    parser.add_argument("--window-ms", type=float, default=2.0, help="the scheduler's window in the merged phase")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=4)
    parser.add_argument("--delta", default="prompt", help="the tenants' delta kind (prompt, lora, bias, adapter, ...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workload", choices=("evaluate", "generate"), default="evaluate",
                        help="what the tenants send: Evaluate calls of a population, or Generate calls")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="with --workload generate")
    args = parser.parse_args(argv)
    if not 1 <= args.tenants <= 64 or not 1 <= args.popsize <= 1024 or not 0 < args.seconds <= 600:
        parser.error("--tenants 1..64, --popsize 1..1024, --seconds (0, 600]")
    if args.workload == "generate" and not 1 <= args.popsize <= 256:
        parser.error("--workload generate: --popsize (texts per Generate call) 1..256")
    if not 1 <= args.max_new_tokens <= 1024:
        parser.error("--max-new-tokens 1..1024")
    if not 1 <= args.rounds <= 100 or args.window_ms <= 0:
        parser.error("--rounds 1..100, --window-ms > 0")
    backbone = load_backbone(args.model, device=args.device, dtype="float32" if args.device == "cpu" else "auto")
    stretches: dict[float, list[dict]] = {args.window_ms: [], 0.0: []}
    for number in range(args.rounds):
        order = (args.window_ms, 0.0) if number % 2 == 0 else (0.0, args.window_ms)
        for window_ms in order:
            stretches[window_ms].append(phase(backbone, args, window_ms, args.seconds / args.rounds))
    merged = summary(stretches[args.window_ms], args, args.window_ms)
    serial = summary(stretches[0.0], args, 0.0)
    result = {
        "script": "bench_tenants", "model": args.model, "delta": args.delta, "device": str(backbone.device),
        "workload": args.workload, "max_new_tokens": args.max_new_tokens if args.workload == "generate" else None,
        "tenants": args.tenants,
        "popsize": args.popsize, "seconds": args.seconds, "rounds": args.rounds, "window_ms": args.window_ms,
        "merge_max_tokens": args.merge_max_tokens,
        "merged_vs_serial": round(merged["generations_per_s"] / serial["generations_per_s"], 3)
        if serial["generations_per_s"] else None,
        "rows_per_forward": merged["rows_per_forward"], "p99_ms": merged["p99_ms"],
        "p99_over_mean_max": merged["p99_over_mean_max"], "merged": merged, "serial": serial,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
