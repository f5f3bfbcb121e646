"""How a forward's cost per token moves with its size, on this device: what the merge
bound (`--merge-max-tokens`) should be.

    python scripts/bench_forward_sizes.py --model tiny-llama

One session's soft-prompt candidates on one bucket of 16 short texts, scored in one
forward for populations of 1, 2, 3, 4, 6, 8, 12 and 16 (the sizes interleaved, each
timed --reps times, the median kept). Merging requests pays while a bigger forward is
cheaper per token; the last JSON line holds the curve and `knee_tokens`, the smallest
size within 5% of the cheapest per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from backbone_server.deltas import DeltaConfig
from backbone_server.engine import Engine
from backbone_server.models import load_backbone

WORDS = "a great film a bad film very good not good at all the story was fine and the music too dull".split()
POPULATIONS = (1, 2, 3, 4, 6, 8, 12, 16)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--dim", type=int, default=16)
    args = parser.parse_args(argv)
    if not 1 <= args.reps <= 100:
        parser.error("--reps 1..100")
    backbone = load_backbone(args.model, device=args.device, dtype="float32" if args.device == "cpu" else "auto")
    engine = Engine(backbone, batch_window_ms=0)
    rng = np.random.default_rng(0)
    texts = [(" ".join(rng.choice(WORDS, size=8)), "", i % 2) for i in range(16)]
    session = engine.create_session({"train": texts}, "{prompt} {text_a} It was {mask}", ["bad", "great"],
                                    DeltaConfig("prompt", prompt_length=4, intrinsic_dim=args.dim))
    bucket, prefix = next(engine.batcher.buckets(session, "train", 0, session.select("train", 0, 0),
                                                 engine.bounds.inference))
    prompts = {p: engine._delta_of(session, rng.normal(size=(p, args.dim)).astype(np.float32))[0]
               for p in POPULATIONS}
    times: dict[int, list[float]] = {p: [] for p in POPULATIONS}

    def forward(p: int) -> None:
        engine.scorer.forward_chunk(session, bucket, prompts[p], None, prefix)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for p in POPULATIONS:
            forward(p)  # warm-up
        for _ in range(args.reps):
            for p in POPULATIONS:
                began = time.perf_counter()
                forward(p)
                times[p].append(time.perf_counter() - began)
    curve = []
    for p in POPULATIONS:
        tokens = p * bucket.tokens_per_candidate
        ms = statistics.median(times[p]) * 1e3
        curve.append({"population": p, "tokens": tokens, "ms": round(ms, 3), "us_per_token": round(ms / tokens * 1e3, 3)})
        print(f"{tokens:6d} tokens: {ms:8.2f} ms, {ms / tokens * 1e3:6.2f} us per token", file=sys.stderr)
    best = min(point["us_per_token"] for point in curve)
    knee = next(point["tokens"] for point in curve if point["us_per_token"] <= 1.05 * best)
    print(json.dumps({"script": "bench_forward_sizes", "model": args.model, "device": str(backbone.device),
                      "reps": args.reps, "curve": curve, "best_us_per_token": best, "knee_tokens": knee}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
