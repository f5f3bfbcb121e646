"""Time per generation of each delta kind against the same batched forward with no delta.

    python scripts/bench_deltas.py --config smollm2-135m --popsize 10 --batch 16 --length 20

Builds the model from a real config with random weights (speed does not depend on the
weights), then for each kind times `Engine.evaluate` of one population on the same
examples, alternating with the no-delta forward (ABAB...) so that drift on a shared
machine hits both alike. Prefix reuse is off everywhere: this measures what the delta
itself costs. Prompt kinds add `--prompt-length` tokens to every row, which the ratio
includes. Prints a table; its last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backbone_server.deltas import DELTA_KINDS, Delta, DeltaConfig, register_delta  # noqa: E402
from backbone_server.engine import Engine  # noqa: E402
from backbone_server.models import resolve_device, resolve_dtype  # noqa: E402
from bench_server import CONFIGS, VERBALIZER, build, synchronize, synthetic_examples  # noqa: E402

BASELINE = "none"


@register_delta
class NoDelta(Delta):
    """The reference: the template's rows with nothing injected."""

    name = BASELINE


def time_call(engine: Engine, session_id: str, z: np.ndarray, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    engine.evaluate(session_id, "train", z)
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=[*CONFIGS, "tiny-llama"], default="smollm2-135m")
    parser.add_argument("--kinds", default=",".join(k for k in sorted(DELTA_KINDS) if k != BASELINE))
    parser.add_argument("--popsize", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=20, help="mean text tokens per example")
    parser.add_argument("--prompt-length", type=int, default=10)
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in DELTA_KINDS]
    if unknown:
        parser.error(f"unknown delta kinds {unknown}; the server knows {', '.join(sorted(DELTA_KINDS))}")

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    backbone = build(args.config, device, dtype)
    engine = Engine(backbone, prefix_reuse=False)
    examples = synthetic_examples(backbone.tokenizer, args.batch, args.length, seed=0)
    template = ("{prompt}{text_a} It was {mask}" if backbone.architecture == "causal"
                else "{prompt}{text_a} . It was {mask} .")
    z = np.random.default_rng(0).normal(size=(args.popsize, args.dim)).astype(np.float32)

    def session_for(kind: str) -> str:
        length = args.prompt_length if DELTA_KINDS[kind].takes_prompt else 0
        config = DeltaConfig(kind, prompt_length=length, intrinsic_dim=args.dim, seed=0)
        return engine.create_session({"train": examples}, template, VERBALIZER, config).id

    baseline = session_for(BASELINE)
    time_call(engine, baseline, z, device)  # warm-up
    rows = []
    for kind in kinds:
        session = session_for(kind)
        time_call(engine, session, z, device)  # warm-up
        pairs = [(time_call(engine, baseline, z, device), time_call(engine, session, z, device))
                 for _ in range(args.repeats)]
        rows.append({
            "kind": kind,
            "num_parameters": engine.get_session(session).delta.num_parameters,
            "none_ms": statistics.median(a for a, _ in pairs),
            "kind_ms": statistics.median(b for _, b in pairs),
            "ratio": statistics.median(b / a for a, b in pairs),
        })
        print(f"... {kind}: {rows[-1]['ratio']:.3f}x", file=sys.stderr, flush=True)

    print(f"{args.config} on {device} ({str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads), "
          f"P={args.popsize} B={args.batch} L~{args.length} d={args.dim}, prompt kinds N={args.prompt_length}; "
          f"median of {args.repeats} alternating pairs")
    print("| delta | D | ms / generation | no delta, ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['kind']} | {row['num_parameters']:,} | {row['kind_ms']:.0f} | {row['none_ms']:.0f} "
              f"| {row['ratio']:.3f} |")
    print(json.dumps({"config": args.config, "device": str(device), "popsize": args.popsize, "batch": args.batch,
                      "length": args.length, "prompt_length": args.prompt_length, "dim": args.dim,
                      "repeats": args.repeats, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
