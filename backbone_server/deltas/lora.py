"""LoRA from the intrinsic subspace: every candidate gets its own low-rank update
delta_W = B A of chosen projections (Linear modules, or GPT-2's Conv1D), with A and B
generated from z.

For each target projection (in -> out) and rank r, a candidate's parameters hold A (r x in,
segment "lora_A") and B (out x r, "lora_B"): A = A0 + (its block of P z), B = (its block
of P z), with ONE projection P of size D = sum over targets of r * (in + out) and A0 a
fixed matrix drawn from the session's seed (LoRA's own start: A random, B zero). So z = 0
is exactly the base model, and the update is linear in z near 0 (a gradient at z = 0 is
not zero). While the engine runs a chunk of p candidates (rows laid out candidate-major,
p * B rows), each target's forward becomes

    base(x) + ((x.view(p, B * L, in) @ A_p^T) @ B_p^T).view_as(base(x))

one batched matmul over the candidates (a forward hook, removed after the chunk).

Scale: A0 has entries of standard deviation 1 / sqrt(in), so x A0^T keeps the spread of
x; for z ~ N(0, I) the B block gets a spread of projection_scale * std(W) * sqrt(in / r),
which gives the entries of B A0 about projection_scale * std(W) (the base weight's own
spread, as BBT scales prompts to the embeddings'), and the A block perturbs A0 by
projection_scale / sqrt(in).

The hook reads the projection's input and adds to its output, so a Conv1D (weight stored
as (in, out)) takes the same update as a Linear.

Defaults: rank 4; targets the attention query and value projections, found by name
suffix (q_proj / v_proj for Llama-like models, query / value for BERT-like ones, GPT-2's
fused query-key-value c_attn, PEFT's default there).

All these spreads are then multiplied by base_scale = 0.15: at the full spreads a random
z ~ N(0, I) raises SmolLM2's SST-2 train CE from 0.62 to 2.1 on average (the model is
broken), at 0.15 by about as much as BBT's soft-prompt scaling moves it (see
scripts/probe_scale.py and docs/performance.md).

Export: PEFT's LORA, `lora_A.weight` and `lora_B.weight` per target, with lora_alpha = r
(scaling 1): PEFT's update x A^T B^T is the engine's. PEFT's factors have these shapes for
a Conv1D too; its `fan_in_fan_out` (set for Conv1D targets, as PEFT wants for GPT-2) only
says how to merge B A into the transposed weight.
"""

from __future__ import annotations

import torch

from backbone_server.deltas.base import DeltaConfig, ProjectedWeights, register_delta
from backbone_server.deltas.exported import Exported, ExportRequest, peft_key, peft_load, store
from backbone_server.deltas.hooks import forward_hooks
from backbone_server.deltas.modules import (
    PROJECTIONS,
    default_targets,
    features,
    find_modules,
    is_conv1d,
    is_projection,
    type_names,
)

DEFAULT_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",))


@register_delta
class LoRA(ProjectedWeights):
    name = "lora"
    summary = "a rank-r update B A of the weight of chosen Linear (or Conv1D) modules (LoRA)"
    rank_name = "rank"
    default_rank = 4
    gated_roles = ("lora_B",)  # the update B A x is linear in B
    peft_type = "LORA"
    base_scale = 0.15

    def __init__(self, config: DeltaConfig, backbone):
        super().__init__(config, backbone)
        self.rank = r = config.rank or self.default_rank
        body = backbone.body
        targets = config.targets or default_targets(body, DEFAULT_TARGETS, is_projection, PROJECTIONS, "LoRA")
        self.modules = find_modules(body, targets, is_projection, PROJECTIONS)
        self._check_rank(r, [(min(width_in, width_out), f"min(in, out) of {name} ({width_in} -> {width_out})")
                             for name, (width_in, width_out) in ((n, features(m)) for n, m in self.modules)])
        self.conv1d = any(is_conv1d(module) for _, module in self.modules)
        self.description = (f"rank-{r} update B A of the weight of each of {len(self.modules)} "
                            f"{type_names(self.modules)} modules ({', '.join(targets)})")
        scale = config.projection_scale
        factors = []
        for _, module in self.modules:  # A starts at A0, B at zero
            width_in, width_out = features(module)
            spread = module.weight.float().std().item()
            factors.append((module, ("lora_A", (r, width_in), scale / width_in ** 0.5),
                            ("lora_B", (width_out, r), scale * spread * (width_in / r) ** 0.5)))
        self._targets = self._build_factors(config, backbone, factors)

    row_local = True

    def patched(self, params: torch.Tensor, slots: torch.Tensor | None = None, routing=None):
        return forward_hooks(self.row_hooks(params))

    def row_hooks(self, params: torch.Tensor, slots: torch.Tensor | None = None) -> list:
        hooks = []
        for module, a_segment, b_segment in self._targets:
            weight = module.weight
            # (p, in, r) and (p, r, out), in the module's dtype and on its device.
            a_t = a_segment.of(params).transpose(1, 2).to(device=weight.device, dtype=weight.dtype)
            b_t = b_segment.of(params).transpose(1, 2).to(device=weight.device, dtype=weight.dtype)
            hooks.append((module, _lora_hook(a_t, b_t)))
        return hooks

    def export_parameters(self, params: torch.Tensor, request: ExportRequest) -> Exported:
        tensors = {peft_key(segment): store(segment.of(params)) for segment in self.layout}
        modules = list(self.layout.by_module())
        causal = request.backbone.architecture == "causal"
        # task_type None (a plain PeftModel) for masked LMs: PEFT has no masked-LM task.
        adapter = {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM" if causal else None,
            "base_model_name_or_path": request.base_model, "revision": None, "inference_mode": True,
            "r": self.rank, "lora_alpha": self.rank, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
            "target_modules": modules, "bias": "none", "fan_in_fan_out": self.conv1d,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        }
        return Exported(self.name, tensors, adapter, peft_load(request.backbone), self.description, modules)


def _lora_hook(a_t: torch.Tensor, b_t: torch.Tensor):
    p = a_t.shape[0]

    def hook(module, args, output):
        x = args[0]
        update = torch.bmm(torch.bmm(x.reshape(p, -1, x.shape[-1]), a_t), b_t)
        return output + update.view_as(output)

    return hook
