"""Attention for the prefix path of causal models, without copying what the rows share.

On the prefix path a chunk's p x B rows (p candidates, B examples) attend, at every
layer, to three sets of keys and values: the tokens ahead of {prompt} (one set per
example, the same for every candidate), the n virtual tokens (one set per candidate, the
same for every example) and the row's own tokens. Concatenating them per row, as a cache
does, copies the shared sets p and B times at every layer; at BBT's shapes on a CPU those
copies took longer than the rows' whole computation. `shared_attention` instead scores the
rows' queries against each set where it lives (broadcast over the other axis) and takes
one softmax over all keys: the same attention, without the copies.

It is registered with transformers' AttentionInterface as ATTENTION_NAME (the library's
way to plug in an attention kernel; no model code is changed), and used only inside
`attending(backbone, past)`, which points the model's config at it for the forwards it
encloses. Whether a model dispatches its attention through that interface is checked once
per model against the cache path (`supported`); the engine keeps the cache path where it
does not.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "blackbox-shared"


@dataclass
class SharedPast:
    """What the rows of a chunk attend to ahead of themselves, per layer: `ahead` (pa, B,
    kv_heads, La, head_dim) keys and values with pa 1 (shared) or p (per candidate) and
    their (B, La) mask, or None; `virtual` (p, kv_heads, n, head_dim) keys and values."""

    candidates: int
    examples: int
    ahead: list[tuple[torch.Tensor, torch.Tensor]] | None
    ahead_mask: torch.Tensor | None
    virtual: list[tuple[torch.Tensor, torch.Tensor]]


# One SharedPast for all the rows, or (first row, end row, SharedPast) segments: several
# chunks of different requests in one forward (backbone_server/scheduler.py).
_ACTIVE: contextvars.ContextVar[SharedPast | list | None] = contextvars.ContextVar("shared_past", default=None)


def shared_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """(p * B, heads, L, d) queries, (p * B, kv_heads, L, d) keys and values of the rows
    themselves -> (p * B, L, heads, d): attention over the active SharedPast, then the
    row's own tokens up to each query (causal)."""
    past = _ACTIVE.get()
    if past is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout or kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise NotImplementedError("shared attention has no dropout, softcapping or sliding window")
    if isinstance(past, list):
        return torch.cat([_attend(module, query[a:b], key[a:b], value[a:b], part, scaling)
                          for a, b, part in past]), None
    return _attend(module, query, key, value, past, scaling), None


def _attend(module, query, key, value, past: SharedPast, scaling: float | None) -> torch.Tensor:
    """One chunk's rows: (p * B, L, heads, d)."""
    p, size = past.candidates, past.examples
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    # (p, B, kv_heads, R, d) with R = groups x L: query head h reads key head h // groups
    # (transformers' repeat_kv order). Each part's matmul keeps its own batch axes, so
    # that nothing is broadcast (a broadcast matmul would copy the shared part again).
    q = query.reshape(p, size, kv_heads, groups * length, dim) * scale
    own_k = key.reshape(p, size, kv_heads, length, dim)
    own_v = value.reshape(p, size, kv_heads, length, dim)
    parts = [_VirtualPart(*past.virtual[module.layer_idx])]
    if past.ahead is not None:
        parts.insert(0, _AheadPart(*past.ahead[module.layer_idx], past.ahead_mask))
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril().repeat(groups, 1)
    scores = [part.scores(q) for part in parts] + [(q @ own_k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))]
    weights = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(value.dtype)
    weights = weights.split([s.shape[-1] for s in scores], dim=-1)
    out = weights[-1] @ own_v
    for part, weight in zip(parts, weights):
        out = out + part.values(weight)
    out = out.reshape(rows, heads, length, dim)
    return out.transpose(1, 2).contiguous()


class _VirtualPart:
    """Keys and values (p, kv_heads, n, d) of each candidate, for all its B examples."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values_ = keys, values

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        p, size, g, r, d = q.shape
        flat = q.transpose(1, 2).reshape(p, g, size * r, d) @ self.keys.transpose(-1, -2)  # (p, g, B R, n)
        return flat.view(p, g, size, r, -1).transpose(1, 2)

    def values(self, weights: torch.Tensor) -> torch.Tensor:
        p, size, g, r, n = weights.shape
        flat = weights.transpose(1, 2).reshape(p, g, size * r, n) @ self.values_  # (p, g, B R, d)
        return flat.view(p, g, size, r, -1).transpose(1, 2)


class _AheadPart:
    """Keys and values (pa, B, kv_heads, La, d) of the tokens ahead: pa = 1 when every
    candidate shares them, p when each has its own; masked where padded."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        self.keys, self.values_, self.mask = keys, values, mask

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        p, size, g, r, d = q.shape
        if self.keys.shape[0] == p:
            scores = q @ self.keys.transpose(-1, -2)
        else:  # one set for all candidates: the candidates' queries side by side
            flat = q.permute(1, 2, 0, 3, 4).reshape(size, g, p * r, d) @ self.keys[0].transpose(-1, -2)
            scores = flat.view(size, g, p, r, -1).permute(2, 0, 1, 3, 4)
        return scores.masked_fill(~self.mask[None, :, None, None, :], float("-inf"))

    def values(self, weights: torch.Tensor) -> torch.Tensor:
        p, size, g, r, length = weights.shape
        if self.values_.shape[0] == p:
            return weights @ self.values_
        flat = weights.permute(1, 2, 0, 3, 4).reshape(size, g, p * r, length) @ self.values_[0]
        return flat.view(size, g, p, r, -1).permute(2, 0, 1, 3, 4)


AttentionInterface.register(ATTENTION_NAME, shared_attention)


@contextlib.contextmanager
def attending(backbone, past: SharedPast | list):
    """The body's forwards inside use shared attention over `past` (or over each
    (first row, end row, SharedPast) segment for its rows)."""
    config = backbone.model.config
    token = _ACTIVE.set(past)
    previous, config._attn_implementation = config._attn_implementation, ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE.reset(token)


def supported(backbone) -> bool:
    """Whether `backbone` runs shared attention as the cache path would: one random prefix
    on a random row, scored both ways."""
    config = backbone.model.config
    if backbone.architecture != "causal" or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    device, dtype = backbone.device, backbone.dtype
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(backbone.embeddings.weight.shape[0], (1, 5), generator=generator).to(device)
    with torch.no_grad():
        ahead = backbone.body(input_ids=tokens[:, :2], use_cache=True).cache
        virtual = [(torch.randn_like(layer.keys), torch.randn_like(layer.values)) for layer in ahead.layers]
        positions = torch.arange(4, 7, device=device)[None]
        full = DynamicCache(ddp_cache_data=[(torch.cat([layer.keys, k], 2), torch.cat([layer.values, v], 2))
                                            for layer, (k, v) in zip(ahead.layers, virtual)], config=config)
        expected = backbone.body(input_ids=tokens[:, 2:], cache=full, position_ids=positions,
                                 attention_mask=torch.ones(1, 7, dtype=torch.long, device=device)).last_hidden_state
        past = SharedPast(1, 1, [(layer.keys[None], layer.values[None]) for layer in ahead.layers],
                          torch.ones(1, 2, dtype=torch.bool, device=device), virtual)
        try:
            with attending(backbone, past):
                got = backbone.body(input_ids=tokens[:, 2:], position_ids=positions, use_cache=False).last_hidden_state
        except Exception:
            return False
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return bool(torch.allclose(got.float(), expected.float(), rtol=0, atol=tolerance * max(1.0, expected.abs().max())))
