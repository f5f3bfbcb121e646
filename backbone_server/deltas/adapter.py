"""Bottleneck adapters (Houlsby et al. 2019) from the intrinsic subspace: every candidate
gets its own small residual MLP on the output of chosen sublayers, generated from z.

For each adapted sublayer with output y (width h) and bottleneck size m, a candidate's
parameters hold W_down (m x h) and W_up (h x m), and the sublayer's output becomes

    y + W_up gelu(W_down y)

(Houlsby's adapter with its own skip connection, before the model's residual and norm).
W_down = W_d0 + (its block of P z) and W_up = (its block of P z), with ONE projection P
of size D = sum over adapted sublayers of 2 m h and W_d0 a fixed matrix drawn from the
session's seed (like LoRA's A0). So z = 0 is exactly the base model and the update is
linear in z near 0 (a gradient at z = 0 is not zero). The nonlinearity is GELU (smooth,
so finite differences and the gradient path agree).

The bottleneck size m travels in DeltaConfig.rank (0: the default, 8).

Where (module-name suffixes, `targets`; each built delta's `description` says it):

* Llama-like models: the outputs of each layer's `self_attn` and `mlp` modules, i.e. the
  attention and feed-forward outputs before they are added to the residual stream. The
  attention module returns a tuple; its first element (the hidden states) is adapted.
* BERT/RoBERTa-like models: the outputs of each layer's `attention.output.dense` and
  `output.dense` Linear modules, i.e. the attention and feed-forward projections before
  dropout, the residual addition and the LayerNorm: exactly Houlsby's placement.
  (Hooking the `attention.output` / `output` modules themselves would put the adapter
  after the LayerNorm.)
* GPT-2: the outputs of each layer's `attn.c_proj` and `mlp.c_proj` Conv1D modules, the
  same placement (the attention and feed-forward output projections, before dropout and
  the residual addition).

`targets` picks other modules instead; a projection's (Linear, Conv1D) adapter has its
output width, any other module's the model's hidden size.

While the engine runs a chunk of p candidates (rows laid out candidate-major, p * B
rows), a forward hook computes every candidate's adapter in two batched matmuls:
y.view(p, B * L, h) @ W_down^T -> gelu -> @ W_up^T.

Scale: the projection has unit spread. W_d0 has entries of standard deviation
1 / sqrt(h), so W_d0 y keeps the spread of y, and the W_down block perturbs W_d0 by
projection_scale / sqrt(h) per entry (relative size projection_scale, as LoRA's A). For
z ~ N(0, I) the W_up block's entries have standard deviation projection_scale / sqrt(m),
so W_up gelu(W_down y) has a spread of about projection_scale * rms(gelu(W_d0 y)), which
is roughly projection_scale / 2 times the sublayer output's own spread (gelu keeps about
half of a small Gaussian's spread, a bit more for large ones). The adapter is thus scaled
relative to the activations it reads, with no statistics to measure.

All these spreads are then multiplied by base_scale = 0.15, for the reason LoRA's are
(random z at the full spreads raises SmolLM2's SST-2 train CE from 0.62 to 2.0).

Segments: "adapter_down" (m x h) and "adapter_up" (h x m) per adapted module. Export:
blackbox's own BLACKBOX_ADAPTER, in PEFT's folder layout (PEFT has no bottleneck adapter
of this form); `backbone_server.export.apply_adapters` applies it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbone_server.deltas.base import DeltaConfig, ProjectedWeights, register_delta
from backbone_server.deltas.exported import Exported, ExportRequest, peft_key, plain_load, store
from backbone_server.deltas.hooks import forward_hooks
from backbone_server.deltas.modules import default_targets, features, find_modules, is_projection

DEFAULT_TARGETS = (("self_attn", "mlp"), ("attention.output.dense", "output.dense"), ("attn.c_proj", "mlp.c_proj"))


def _any_module(module: nn.Module) -> bool:
    return True


@register_delta
class Adapter(ProjectedWeights):
    name = "adapter"
    summary = "a bottleneck adapter y + W_up gelu(W_down y) on the output of chosen modules (Houlsby)"
    rank_name = "bottleneck size"
    default_rank = 8
    gated_roles = ("adapter_up",)  # the update is linear in W_up
    peft_type = "BLACKBOX_ADAPTER"
    base_scale = 0.15

    def __init__(self, config: DeltaConfig, backbone):
        super().__init__(config, backbone)
        self.size_m = m = config.rank or self.default_rank
        body = backbone.body
        targets = config.targets or default_targets(body, DEFAULT_TARGETS, _any_module, "modules", "adapter")
        self.modules = find_modules(body, targets, _any_module, "modules")
        self.description = (f"bottleneck adapter (size {m}, gelu) on the output of each of "
                            f"{len(self.modules)} modules ({', '.join(targets)})")
        scale = config.projection_scale
        widths = [features(module)[1] if is_projection(module) else self.hidden_size for _, module in self.modules]
        self._check_rank(m, [(width, f"the width of the output of {name}")
                             for (name, _), width in zip(self.modules, widths)])
        self._targets = self._build_factors(config, backbone, [  # W_down starts at W_d0, W_up at zero
            (module, ("adapter_down", (m, width), scale / width ** 0.5), ("adapter_up", (width, m), scale / m ** 0.5))
            for (_, module), width in zip(self.modules, widths)
        ])

    row_local = True

    def patched(self, params: torch.Tensor, slots: torch.Tensor | None = None, routing=None):
        return forward_hooks(self.row_hooks(params))

    def row_hooks(self, params: torch.Tensor, slots: torch.Tensor | None = None) -> list:
        hooks = []
        for module, down_segment, up_segment in self._targets:
            # (p, width, m) and (p, m, width), in the model's dtype.
            down_t = down_segment.of(params).transpose(1, 2).to(dtype=self.dtype)
            up_t = up_segment.of(params).transpose(1, 2).to(dtype=self.dtype)
            hooks.append((module, _adapter_hook(down_t, up_t)))
        return hooks

    def export_parameters(self, params: torch.Tensor, request: ExportRequest) -> Exported:
        tensors = {peft_key(segment): store(segment.of(params)) for segment in self.layout}
        modules = list(self.layout.by_module())
        adapter = {
            "peft_type": self.peft_type, "task_type": None, "base_model_name_or_path": request.base_model,
            "bottleneck_size": self.size_m, "activation": "gelu", "activation_approximate": "none",
            "target_modules": modules,
            "placement": "on the output of each target module (a module returning a tuple: its first element): "
                         "y -> y + adapter_up(gelu(adapter_down(y))), before the model's residual addition "
                         "and norm",
            "description": f"{self.description}: adapter_model.safetensors holds, per module, "
                           "'base_model.model.<module path>.adapter_down.weight' (m x h) and "
                           "'.adapter_up.weight' (h x m), bias-free Linear weights; gelu is the exact (erf) "
                           "GELU. Not a PEFT type: apply it with backbone_server.export.apply_adapters(model, folder).",
        }
        how = f"{plain_load(request.backbone)}; backbone_server.export.apply_adapters(model, THIS_FOLDER)"
        return Exported(self.name, tensors, adapter, how, self.description, modules)


def _adapter_hook(down_t: torch.Tensor, up_t: torch.Tensor):
    p = down_t.shape[0]

    def hook(module, args, output):
        y = output[0] if isinstance(output, tuple) else output
        d, u = down_t.to(y.device), up_t.to(y.device)
        update = torch.bmm(F.gelu(torch.bmm(y.reshape(p, -1, y.shape[-1]), d)), u)
        y = y + update.view_as(y)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    return hook
