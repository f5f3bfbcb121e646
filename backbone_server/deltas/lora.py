"""LoRA from the intrinsic subspace: every candidate gets its own low-rank update
delta_W = B A of chosen Linear modules, with A and B generated from z.

For each target Linear (in -> out) and rank r, a candidate's parameters hold A (r x in)
and B (out x r): A = A0 + (its block of P z), B = (its block of P z), with ONE projection
P of size D = sum over targets of r * (in + out) and A0 a fixed matrix drawn from the
session's seed (LoRA's own start: A random, B zero). So z = 0 is exactly the base model,
and the update is linear in z near 0 (a gradient at z = 0 is not zero). While the engine
runs a chunk of p candidates (rows laid out candidate-major, p * B rows), each target's
forward becomes

    base(x) + ((x.view(p, B * L, in) @ A_p^T) @ B_p^T).view_as(base(x))

one batched matmul over the candidates (a forward hook, removed after the chunk).

Scale: A0 has entries of standard deviation 1 / sqrt(in), so x A0^T keeps the spread of
x; for z ~ N(0, I) the B block gets a spread of projection_scale * std(W) * sqrt(in / r),
which gives the entries of B A0 about projection_scale * std(W) (the base weight's own
spread, as BBT scales prompts to the embeddings'), and the A block perturbs A0 by
projection_scale / sqrt(in).

Defaults: rank 4; targets the attention query and value projections, found by name
suffix (q_proj / v_proj for Llama-like models, query / value for BERT-like ones).

All these spreads are then multiplied by base_scale = 0.15: at the full spreads a random
z ~ N(0, I) raises SmolLM2's SST-2 train CE from 0.62 to 2.1 on average (the model is
broken), at 0.15 by about as much as BBT's soft-prompt scaling moves it (see
scripts/probe_scale.py and docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import nn

from backbone_server.deltas.base import (
    DeltaConfig,
    ProjectedWeights,
    check_no_prompt,
    default_targets,
    find_modules,
    forward_hooks,
    register_delta,
)

DEFAULT_RANK = 4
DEFAULT_TARGETS = (("q_proj", "v_proj"), ("query", "value"))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


@register_delta("lora")
class LoRA(ProjectedWeights):
    base_scale = 0.15

    def __init__(self, config: DeltaConfig, backbone):
        check_no_prompt(config)
        self.config = config
        self.rank = config.rank or DEFAULT_RANK
        self.hidden_size = backbone.hidden_size
        self.dtype = backbone.dtype
        body = backbone.body
        targets = config.targets or default_targets(body, DEFAULT_TARGETS, _is_linear, "Linear modules", "LoRA")
        self.modules = find_modules(body, targets, _is_linear, "Linear modules")
        self.description = (f"rank-{self.rank} update B A of the weight of each of {len(self.modules)} Linear "
                            f"modules ({', '.join(targets)})")
        # Per target: where its A and B start in a candidate's parameters.
        self.layout: list[tuple[nn.Module, int, int, int]] = []  # (module, offset, in, out)
        scales, starts = [], []
        generator = torch.Generator(device="cpu").manual_seed(int(config.seed))
        offset = 0
        for _, module in self.modules:
            fan_in, fan_out, r = module.in_features, module.out_features, self.rank
            self.layout.append((module, offset, fan_in, fan_out))
            weight_std = module.weight.float().std().item()
            scales += [torch.full((r * fan_in,), config.projection_scale / fan_in ** 0.5),
                       torch.full((r * fan_out,), config.projection_scale * weight_std * (fan_in / r) ** 0.5)]
            starts += [torch.randn(r * fan_in, generator=generator) / fan_in ** 0.5, torch.zeros(r * fan_out)]
            offset += r * (fan_in + fan_out)
        self._build_projection(config, backbone.device, scales, starts)  # A0 in every A block, zero in every B block

    def patched(self, params: torch.Tensor, slots: torch.Tensor | None = None):
        p = params.shape[0]
        r = self.rank
        hooks = []
        for module, offset, fan_in, fan_out in self.layout:
            weight = module.weight
            a = params[:, offset:offset + r * fan_in].reshape(p, r, fan_in)
            b = params[:, offset + r * fan_in:offset + r * (fan_in + fan_out)].reshape(p, fan_out, r)
            # (p, in, r) and (p, r, out), in the module's dtype and on its device.
            a_t = a.transpose(1, 2).to(device=weight.device, dtype=weight.dtype)
            b_t = b.transpose(1, 2).to(device=weight.device, dtype=weight.dtype)
            hooks.append((module, _lora_hook(a_t, b_t)))
        return forward_hooks(hooks)


def _lora_hook(a_t: torch.Tensor, b_t: torch.Tensor):
    p = a_t.shape[0]

    def hook(module, args, output):
        x = args[0]
        update = torch.bmm(torch.bmm(x.reshape(p, -1, x.shape[-1]), a_t), b_t)
        return output + update.view_as(output)

    return hook
