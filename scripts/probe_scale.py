"""How far a random z moves the model, per delta kind and projection scale (BBT's alpha).

    python scripts/probe_scale.py --kinds prompt,lora,adapter,bias --alphas 0.3,1,3

For each kind and alpha, scores z = 0 and a population of z ~ N(0, I) (what CMA-ES
samples first at sigma 1) on a task's k-shot training split, and prints the train
cross-entropy and accuracy of both. A kind whose random z sends the loss far above
z = 0's starts its search in a broken model; one whose loss barely moves wastes the
first generations. Runs in process on the bundled model (or --model) with the engine
the server uses; its last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from backbone_server.deltas import DELTA_KINDS, DeltaConfig  # noqa: E402
from backbone_server.engine import Engine  # noqa: E402
from backbone_server.models import load_backbone  # noqa: E402
from blackbox.tasks import get_task, load_split, place_prompt  # noqa: E402

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--data-dir")
    parser.add_argument("--kinds", default="prompt,lora,adapter,bias")
    parser.add_argument("--alphas", default="0.3,1,3")
    parser.add_argument("--popsize", type=int, default=10)
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--prompt-length", type=int, default=10)
    parser.add_argument("--placement", choices=("before", "after", "tail"), default="after")
    args = parser.parse_args(argv)

    backbone = load_backbone(args.model, device=args.device)
    engine = Engine(backbone)
    task = get_task(args.task)
    template = place_prompt(task.template_for(backbone.architecture), args.placement)
    train = [(e.text_a, e.text_b, e.label)
             for e in load_split(task, "train", seed=args.seed, data_dir=args.data_dir)]
    z = np.random.default_rng(args.seed).standard_normal((args.popsize, args.dim)).astype(np.float32)
    print(f"{backbone.name} on {backbone.device}, {task.name} seed {args.seed} train ({len(train)} examples), "
          f"P={args.popsize} z ~ N(0, I) of d={args.dim}")
    print("| kind | alpha | CE at z=0 | random CE mean | min | max | acc at z=0 | random acc mean | max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for kind in args.kinds.split(","):
        for alpha in (float(a) for a in args.alphas.split(",")):
            config = DeltaConfig(kind, prompt_length=args.prompt_length if DELTA_KINDS[kind].takes_prompt else 0,
                                 intrinsic_dim=args.dim, seed=args.seed, projection_scale=alpha)
            session = engine.create_session({"train": train}, template, task.verbalizer, config)
            started = time.perf_counter()
            zero = engine.evaluate(session.id, "train", np.zeros((1, args.dim), np.float32))
            moved = engine.evaluate(session.id, "train", z)
            engine.close_session(session.id)
            row = {"kind": kind, "alpha": alpha, "zero_ce": float(zero.ce_loss[0]),
                   "random_ce_mean": float(moved.ce_loss.mean()), "random_ce_min": float(moved.ce_loss.min()),
                   "random_ce_max": float(moved.ce_loss.max()), "zero_acc": float(zero.accuracy[0]),
                   "random_acc_mean": float(moved.accuracy.mean()), "random_acc_max": float(moved.accuracy.max()),
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            print(f"| {kind} | {alpha:g} | {row['zero_ce']:.3f} | {row['random_ce_mean']:.3f} | "
                  f"{row['random_ce_min']:.3f} | {row['random_ce_max']:.3f} | {row['zero_acc']:.3f} | "
                  f"{row['random_acc_mean']:.3f} | {row['random_acc_max']:.3f} |", flush=True)
    print(json.dumps({"model": backbone.name, "task": task.name, "seed": args.seed, "popsize": args.popsize,
                      "dim": args.dim, "placement": args.placement, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
