"""Times one generation of population scoring on a model built from a real config with
random weights: one forward per candidate, one batched forward, the fast path (batched
with the examples' keys and values reused across candidates, the prompt after the text),
and the prefix path (`--delta prefix` after the text: each candidate runs only the
template's tail, attending to the text's cached states and its own virtual keys and
values); with `--grpc`, also the fast path end to end through a server on loopback
around the same model.

    python scripts/bench_server.py --config smollm2-135m --popsize 20 --batch 32 --length 64 --prompt-length 50 --grpc

For each path it prints ms per generation, tokens/s (every candidate x example token
scored: the same count for all paths, so ratios of tokens/s are ratios of time) and the
fraction of the device's matmul peak: a timed square matmul in the bench's dtype (4096^3
on a GPU, 2048^3 on a CPU), the best of a few before the paths run and a few after (on a
shared machine other work can lower either).

FLOPs per generation are an estimate of what each path computes, padding left out:
2 x (weights of the body's linear layers) per token computed, plus attention,
4 x hidden x layers per (query, key) pair (QK^T and AV; a causal query sees the keys up
to itself, a masked one all), plus the head on the one scored position per row. The fast
path computes only the prompt and the tokens after it for each candidate (the text's
keys and values are computed once and cached across generations), so it does less work
for the same tokens. A masked LM has no candidate-independent prefix: its fast path is
the batched one, and the output says so.

The last line is one JSON object with every figure (`batched_vs_serial`,
`fast_vs_batched`, `prefix_vs_prompt_after` (the fast path's time over the prefix
path's): ratios of time per generation, > 1 = faster; with --grpc, `grpc_ms`
and `grpc_overhead_ms` = gRPC ms - fast-path ms, the cost of the RPC and serialisation,
and `grpc_wire_ms` = client time - server handler time within the same calls, the same
cost measured without the drift between two separately timed runs on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from backbone_server.deltas import DELTA_KINDS  # noqa: E402
from backbone_server.deltas.base import DeltaConfig  # noqa: E402
from backbone_server.engine import Engine  # noqa: E402
from backbone_server.models import resolve_device, resolve_dtype, wrap_backbone  # noqa: E402
from backbone_server.tiny import build_tiny_llama, build_tokenizer  # noqa: E402

CONFIGS = {
    # name: (architecture, config kwargs)
    "smollm2-135m": ("causal", dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                    vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)),
    "llama-1b": ("causal", dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True)),
    "roberta-large": ("masked", dict(model_type="roberta", hidden_size=1024, intermediate_size=4096,
                                     num_hidden_layers=24, num_attention_heads=16, vocab_size=50265,
                                     max_position_embeddings=514, pad_token_id=1, type_vocab_size=1)),
}
VERBALIZER = ["bad", "great"]


def build(config_name: str, device: torch.device, dtype: torch.dtype):
    if config_name == "tiny-llama":
        model, tokenizer = build_tiny_llama()
        return wrap_backbone(config_name, model, tokenizer, "causal", device, dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    architecture, kwargs = CONFIGS[config_name]
    config = AutoConfig.for_model(**kwargs)
    auto = AutoModelForCausalLM if architecture == "causal" else AutoModelForMaskedLM
    torch.manual_seed(0)
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype)
    # The tiny word-level tokenizer's ids are valid in any of these vocabularies.
    return wrap_backbone(config_name, model, build_tokenizer(architecture), architecture, device, dtype)


def synthetic_examples(tokenizer, batch: int, length: int, seed: int) -> list[tuple[str, str, int]]:
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(batch):
        # Lengths vary by +-25% around `length`, as real sentences do.
        n = max(1, int(length * rng.uniform(0.75, 1.25)))
        texts.append((" ".join(rng.choice(words, size=n)), "", int(rng.integers(2))))
    return texts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median ms of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def matmul_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """(GFLOP/s, n): the best of a few timed (n x n) @ (n x n) matmuls in `dtype`."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for attempt in range(6):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if attempt:  # the first one warms up
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9, n


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def generation_flops(backbone, rows: list[tuple[int, int]], population: int) -> float:
    """Estimated FLOPs of scoring `population` candidates on `rows`, one per example:
    (keys already cached, tokens computed). See the module docstring."""
    tokens = sum(new for _, new in rows)
    if backbone.architecture == "causal":  # query j of a row sees the cached keys and its keys 0..j
        pairs = sum(cached * new + new * (new + 1) // 2 for cached, new in rows)
    else:
        pairs = sum((cached + new) * new for cached, new in rows)
    body = 2 * linear_weights(backbone.body) * tokens + 4 * backbone.hidden_size * backbone.num_layers * pairs
    head = backbone.head
    # A plain output matrix is applied to the verbalizer's rows only.
    per_row = 2 * backbone.hidden_size * len(VERBALIZER) if isinstance(head, nn.Linear) else 2 * linear_weights(head)
    return population * (body + per_row * len(rows))


def time_grpc(args, backbone, examples, template: str, z: np.ndarray, expected: np.ndarray,
              device: torch.device) -> dict:
    """The fast path end to end: a server on loopback around the same backbone, and a client."""
    from backbone_server.server import create_server
    from blackbox.client import BackboneClient, DeltaSpec
    from blackbox.tasks import Example

    running = create_server(args.config, "127.0.0.1:0", max_batch_tokens=args.max_batch_tokens,
                            prefix_reuse=True, backbone=backbone)
    results = []
    try:
        running.wait_ready(timeout=120)
        with BackboneClient(running.address) as client:
            client.wait_ready(timeout=60)
            session = client.create_session(
                {"train": [Example(a, b or None, label) for a, b, label in examples]}, template, VERBALIZER,
                DeltaSpec(kind=args.delta, prompt_length=args.prompt_length, intrinsic_dim=args.dim, seed=0),
            )

            def call():
                start = time.perf_counter()
                scores = session.evaluate("train", z)
                results.append(((time.perf_counter() - start) * 1e3, scores))

            grpc_ms = timed(call, args.repeats, device)
            session.close()
    finally:
        running.stop(grace=0)
    measured = results[1:]  # not the warm-up
    return {
        "grpc_ms": grpc_ms,
        # Within the same calls, so free of the drift between separately timed runs.
        "grpc_server_ms": statistics.median(scores.server_ms for _, scores in measured),
        "grpc_wire_ms": statistics.median(ms - scores.server_ms for ms, scores in measured),
        "grpc_scores_max_abs_diff": float(np.abs(measured[-1][1].ce_loss - expected).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=[*CONFIGS, "tiny-llama"], default="smollm2-135m")
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="mean text tokens per example")
    parser.add_argument("--prompt-length", type=int, default=50)
    parser.add_argument("--dim", type=int, default=500)
    parser.add_argument("--delta", default="prompt", help=f"delta kind ({', '.join(sorted(DELTA_KINDS))})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch-tokens", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grpc", action="store_true",
                        help="also time the fast path end to end through a server on loopback")
    args = parser.parse_args(argv)
    if args.delta not in DELTA_KINDS:
        parser.error(f"unknown delta kind {args.delta!r}; the server knows {', '.join(sorted(DELTA_KINDS))}")

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    peak_gflops, peak_n = matmul_peak(device, dtype)
    backbone = build(args.config, device, dtype)
    examples = synthetic_examples(backbone.tokenizer, args.batch, args.length, seed=0)
    delta = DeltaConfig(args.delta, prompt_length=args.prompt_length, intrinsic_dim=args.dim, seed=0)
    z = np.random.default_rng(0).normal(size=(args.popsize, args.dim)).astype(np.float32)
    n = args.prompt_length
    before = "{prompt}{text_a} It was {mask}" if backbone.architecture == "causal" else "{prompt}{text_a} . It was {mask} ."
    after = "{text_a}{prompt} It was {mask}"

    plain = Engine(backbone, max_batch_tokens=args.max_batch_tokens, prefix_reuse=False)
    session = plain.create_session({"train": examples}, before, VERBALIZER, delta)
    calls = iter(range(10**9))
    # Each call new candidates: the engine does not score a candidate it has scored already.
    serial_ms = timed(lambda: [plain.evaluate(session.id, "train", z[i:i + 1] + next(calls) * 1e-6)
                               for i in range(len(z))], args.repeats, device)
    batched_ms = timed(lambda: plain.evaluate(session.id, "train", z), args.repeats, device)
    full_rows = [(0, e.length(n)) for e in session.splits["train"]]
    figures = {"config": args.config, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
               "threads": torch.get_num_threads(), "delta": args.delta, "popsize": args.popsize,
               "batch": args.batch, "length": args.length, "prompt_length": n, "dim": args.dim,
               "max_batch_tokens": plain.max_batch_tokens, "repeats": args.repeats,
               "peak_gflops": peak_gflops, "peak_matmul_n": peak_n,
               "serial_ms": serial_ms, "batched_ms": batched_ms}

    # The fast path puts the prompt after the text, so that the text's keys and values
    # are the same for every candidate.
    fast = Engine(backbone, max_batch_tokens=args.max_batch_tokens, prefix_reuse=True)
    fast_template = after if backbone.architecture == "causal" else before
    fast_session = fast.create_session({"train": examples}, fast_template, VERBALIZER, delta)
    if fast_session.prefix_reuse:
        fast_scores = []
        figures["fast_ms"] = timed(lambda: fast_scores.append(fast.evaluate(fast_session.id, "train", z)),
                                   args.repeats, device)
        figures["fast_path"] = "prefix reuse"
        fast_rows = [(len(e.before), n + len(e.after)) for e in fast_session.splits["train"]]
        expected = fast_scores[-1].ce_loss
    else:
        # In a masked LM every token attends to the prompt: nothing is candidate-independent,
        # and the batched forward is the fastest path there is.
        figures["fast_ms"] = batched_ms
        figures["fast_path"] = f"none: a {backbone.architecture} LM has no candidate-independent prefix, fast = batched"
        fast_rows = full_rows
        expected = plain.evaluate(session.id, "train", z).ce_loss
    prefix_flops = 0.0
    if fast_session.prefix_reuse and not all(key in fast.batcher.store for key in fast_session.prefix_keys):  # over budget
        prefix_flops = generation_flops(backbone, [(0, len(e.before)) for e in fast_session.splits["train"]], 1)

    # The prefix kind at the same shapes, after the text: only the template's tail per candidate.
    kv = Engine(backbone, max_batch_tokens=args.max_batch_tokens, prefix_reuse=True)
    kv_delta = DeltaConfig("prefix", prompt_length=n, intrinsic_dim=args.dim, seed=0)
    kv_session = kv.create_session({"train": examples}, fast_template, VERBALIZER, kv_delta)
    figures["prefix_ms"] = timed(lambda: kv.evaluate(kv_session.id, "train", z), args.repeats, device)
    if backbone.architecture == "causal":
        kv_rows = [(len(e.before) + n, len(e.after)) for e in kv_session.splits["train"]]
    else:
        kv_rows = [(n, len(e.before) + len(e.after)) for e in kv_session.splits["train"]]

    tokens = sum(new for _, new in full_rows) * args.popsize
    figures["tokens_per_generation"] = tokens
    flops = {"serial": generation_flops(backbone, full_rows, args.popsize),
             "fast": generation_flops(backbone, fast_rows, args.popsize) + prefix_flops}
    flops["batched"] = flops["serial"]
    flops["prefix"] = generation_flops(backbone, kv_rows, args.popsize)
    paths = ["serial", "batched", "fast", "prefix"]
    if args.grpc:
        figures.update(time_grpc(args, backbone, examples, fast_template, z, expected, device))
        figures["grpc_overhead_ms"] = figures["grpc_ms"] - figures["fast_ms"]
        flops["grpc"] = flops["fast"]
        paths.append("grpc")
    # Again after the paths, the better of the two: a busy moment can lower either one.
    peak_gflops = figures["peak_gflops"] = max(peak_gflops, matmul_peak(device, dtype)[0])
    for path in paths:
        seconds = figures[f"{path}_ms"] / 1e3
        figures[f"{path}_tokens_per_s"] = tokens / seconds
        figures[f"{path}_gflop"] = flops[path] / 1e9
        figures[f"{path}_fraction_of_peak"] = flops[path] / 1e9 / seconds / peak_gflops
    figures["batched_vs_serial"] = serial_ms / batched_ms
    figures["fast_vs_batched"] = batched_ms / figures["fast_ms"]
    figures["fast_vs_serial"] = serial_ms / figures["fast_ms"]
    figures["prefix_vs_prompt_after"] = figures["fast_ms"] / figures["prefix_ms"]

    print(f"{args.config} on {device} ({figures['dtype']}, {figures['threads']} threads), delta {args.delta}, "
          f"P={args.popsize} B={args.batch} L~{args.length} N={n} d={args.dim}: {tokens} tokens / generation")
    print(f"matmul peak: {peak_gflops:.1f} GFLOP/s ({peak_n}^3 in {figures['dtype']})")
    print(f"fast path: {figures['fast_path']}")
    print("| path | ms / generation | tokens / s | GFLOP / generation | % of matmul peak |")
    print("|---|---|---|---|---|")
    for path in paths:
        print(f"| {path} | {figures[path + '_ms']:.1f} | {figures[path + '_tokens_per_s']:.0f} "
              f"| {figures[path + '_gflop']:.2f} | {100 * figures[path + '_fraction_of_peak']:.1f} |")
    print(f"batched vs serial: {figures['batched_vs_serial']:.2f}x, fast vs batched: "
          f"{figures['fast_vs_batched']:.2f}x, fast vs serial: {figures['fast_vs_serial']:.2f}x, "
          f"prefix vs prompt after the text: {figures['prefix_vs_prompt_after']:.2f}x")
    if args.grpc:
        print(f"gRPC: {figures['grpc_ms']:.1f} ms / generation; overhead over the in-process fast path: "
              f"{figures['grpc_overhead_ms']:+.1f} ms ({100 * figures['grpc_overhead_ms'] / figures['fast_ms']:+.1f}%); "
              f"within the same calls, client time - server handler time: {figures['grpc_wire_ms']:.2f} ms; "
              f"losses match the in-process fast path to {figures['grpc_scores_max_abs_diff']:.1e}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
