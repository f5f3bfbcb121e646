"""Times one generation of population scoring three ways on a model built from a real
config with random weights: one forward per candidate, one batched forward, and the fast
path (batched with the examples' keys and values reused across candidates).

    python scripts/bench_server.py --config smollm2-135m --popsize 20 --batch 32 --length 64 --prompt-length 50

Prints a table and, as its last line, one JSON object with every figure
(`batched_vs_serial`, `fast_vs_batched`: ratios of time per generation, > 1 = faster).
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


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=[*CONFIGS, "tiny-llama"], default="smollm2-135m")
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="mean text tokens per example")
    parser.add_argument("--prompt-length", type=int, default=50)
    parser.add_argument("--dim", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch-tokens", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    backbone = build(args.config, device, dtype)
    examples = synthetic_examples(backbone.tokenizer, args.batch, args.length, seed=0)
    delta = DeltaConfig("prompt", prompt_length=args.prompt_length, intrinsic_dim=args.dim, seed=0)
    z = np.random.default_rng(0).normal(size=(args.popsize, args.dim)).astype(np.float32)
    before = "{prompt}{text_a} It was {mask}" if backbone.architecture == "causal" else "{prompt}{text_a} . It was {mask} ."
    after = "{text_a}{prompt} It was {mask}"

    plain = Engine(backbone, max_batch_tokens=args.max_batch_tokens, prefix_reuse=False)
    session = plain.create_session({"train": examples}, before, ["bad", "great"], delta)
    serial_ms = timed(lambda: [plain.evaluate(session.id, "train", z[i:i + 1]) for i in range(len(z))],
                      args.repeats, device)
    batched_ms = timed(lambda: plain.evaluate(session.id, "train", z), args.repeats, device)
    figures = {"config": args.config, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
               "popsize": args.popsize, "batch": args.batch, "length": args.length,
               "prompt_length": args.prompt_length, "max_batch_tokens": plain.max_batch_tokens,
               "serial_ms": serial_ms, "batched_ms": batched_ms}
    if backbone.architecture == "causal":
        fast = Engine(backbone, max_batch_tokens=args.max_batch_tokens, prefix_reuse=True)
        fast_session = fast.create_session({"train": examples}, after, ["bad", "great"], delta)
        figures["fast_ms"] = timed(lambda: fast.evaluate(fast_session.id, "train", z), args.repeats, device)
    else:
        figures["fast_ms"] = batched_ms  # masked LMs have no candidate-independent prefix
    tokens = sum(e.length(args.prompt_length) for e in session.splits["train"]) * args.popsize
    figures["tokens_per_generation"] = tokens
    figures["batched_tokens_per_s"] = tokens / (batched_ms / 1e3)
    figures["batched_vs_serial"] = serial_ms / batched_ms
    figures["fast_vs_batched"] = batched_ms / figures["fast_ms"]

    print(f"{args.config} on {device} ({figures['dtype']}), P={args.popsize} B={args.batch} "
          f"L~{args.length} N={args.prompt_length}")
    print("| path | ms / generation |")
    print("|---|---|")
    for name in ("serial", "batched", "fast"):
        print(f"| {name} | {figures[name + '_ms']:.1f} |")
    print(f"batched vs serial: {figures['batched_vs_serial']:.2f}x, fast vs batched: {figures['fast_vs_batched']:.2f}x")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
