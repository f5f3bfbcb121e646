"""How many tokens one forward may hold: the engine's memory model.

The engine splits work so that (candidate, example) rows x tokens in one forward stay
under a bound. When the operator sets none, the bound comes from the memory free on the
device after the model is loaded and an estimate of the bytes one token costs:

* inference keeps only one layer's transients alive at a time (the residual stream, the
  normalised input, q/k/v, the attention output, the MLP's gate/up/activation) plus, for
  causal models, every layer's keys and values of every row (the cache the forward builds,
  and the prefix states repeated per candidate);
* a gradient call keeps every layer's saved activations until the backward, so its bound
  is smaller by about the number of layers.

The estimate is deliberately generous (a safety factor, and only a fraction of the free
memory is planned for); if a forward runs out of memory anyway, the engine halves its
chunk and retries (see `Scorer.score_chunks` in scoring.py), so a legal request never fails on memory.
On a CPU, throughput is flat from about 1k tokens per forward, so the bound is also
capped at `CPU_BATCH_TOKENS` there; a GPU needs large forwards to reach its peak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

CPU_BATCH_TOKENS = 8192
GPU_BATCH_TOKENS_CAP = 1 << 20
FREE_FRACTION = {"cuda": 0.6, "cpu": 0.25}
SAFETY = 1.5
PREFIX_STORE_FRACTION = 0.1


@dataclass(frozen=True)
class MemoryPlan:
    max_batch_tokens: int  # rows x tokens of one inference forward
    gradient_batch_tokens: int  # rows x tokens of one forward + backward
    reason: str  # how the numbers were chosen, for GetInfo and the log


def bytes_per_token(config, dtype: torch.dtype, architecture: str) -> tuple[float, float]:
    """Estimated device bytes one token costs in an inference forward and in a forward
    kept for a backward, from the model's config."""
    size = torch.finfo(dtype).bits // 8
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_width = getattr(config, "num_key_value_heads", heads) * (hidden // heads)
    layer_transients = 8 * hidden + 3 * intermediate
    cache = 2 * layers * kv_width if architecture == "causal" else 0
    inference = SAFETY * size * (layer_transients + cache)
    # Saved for the backward: about the same activations in every layer, in float32
    # where autocasting or the losses need it; and the transients of the backward itself.
    gradient = SAFETY * size * (layers * (layer_transients + 4 * hidden) + layer_transients + cache)
    return inference, gradient


def free_memory(device: torch.device) -> int:
    """Bytes the device can still give: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def prefix_store_bytes(backbone, free_bytes: int | None = None) -> int:
    """What the engine keeps of prefix states across calls and sessions, unless told:
    PREFIX_STORE_FRACTION of the memory free now (so that a test split's text states, a
    gigabyte for SmolLM2 and SST-2's 872 texts, survive from the zero-shot to the final
    evaluation on a 24 GiB host)."""
    free = free_memory(backbone.device) if free_bytes is None else free_bytes
    return int(PREFIX_STORE_FRACTION * free)


def plan_memory(backbone, requested_tokens: int = 0, free_bytes: int | None = None) -> MemoryPlan:
    """The engine's token bounds: the operator's `requested_tokens` if set (gradients then
    get the share the same memory allows), else derived from `free_bytes` (default: what
    the device has free now)."""
    inference, gradient = bytes_per_token(backbone.model.config, backbone.dtype, backbone.architecture)
    kind = backbone.device.type if backbone.device.type in FREE_FRACTION else "cpu"
    if requested_tokens:
        gradient_tokens = max(1, int(requested_tokens * inference / gradient))
        return MemoryPlan(requested_tokens, gradient_tokens,
                          f"{requested_tokens} tokens per forward as configured "
                          f"({gradient_tokens} with gradients, scaled by the estimate)")
    free = free_memory(backbone.device) if free_bytes is None else free_bytes
    budget = FREE_FRACTION[kind] * free
    cap = CPU_BATCH_TOKENS if kind == "cpu" else GPU_BATCH_TOKENS_CAP
    tokens = max(1, min(cap, int(budget / inference)))
    gradient_tokens = max(1, min(cap, int(budget / gradient)))
    return MemoryPlan(tokens, gradient_tokens,
                      f"{tokens} tokens per forward ({gradient_tokens} with gradients): "
                      f"{FREE_FRACTION[kind]:.0%} of {free / 2**30:.1f} GiB free on {backbone.device} at "
                      f"~{inference / 1024:.0f} KiB per token (~{gradient / 1024:.0f} KiB with gradients)"
                      + (f", capped at {cap} on a CPU" if kind == "cpu" and tokens == cap else ""))
