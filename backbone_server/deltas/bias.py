"""BitFit from the intrinsic subspace: every candidate gets its own additive shift of
chosen module outputs, generated from z.

What is shifted (also in each built delta's `description`):

* Models whose projections carry biases (BERT/RoBERTa-like Linear modules, GPT-2's
  Conv1D): the output of every projection of the base model that has a bias (attention
  query/key/value and output projections, the feed-forward layers), i.e. exactly a shift
  of those bias vectors, the BitFit parameters. The LM head is not touched.
* Models without biases (Llama-like): the output of every RMSNorm/LayerNorm of the base
  model (each layer's input_layernorm and post_attention_layernorm and the final norm),
  a per-channel additive shift of the normalised hidden state, i.e. a bias added after
  the norm's weight.

`targets` (module-name suffixes) picks other projections or norm modules instead; a
shift of a projection without a bias adds one.

All shifts come from ONE projection of z of size D = sum over targets of their output
width, with no offset, so z = 0 is exactly the base model. While the engine runs a
chunk of p candidates (rows laid out candidate-major, p * B rows), a forward hook adds
the (p, 1, width) shifts to the (p, B * L, width) output by broadcasting.

Scale: the projection is built with unit spread and each target's block multiplied by
projection_scale * std(W) * sqrt(in) for a projection (about the spread of its output for
unit inputs) and projection_scale * rms(weight) for a norm (the spread of its output).

All these spreads are then multiplied by base_scale = 0.05: shifts are the most
sensitive kind (random z at the full spreads raises SmolLM2's SST-2 train CE from 0.62
to 2.7; at 0.1 still to 0.84).

Segments: "bias_shift" (width,) per shifted module. Export: blackbox's own BLACKBOX_BIAS
(PEFT has no output shift); `backbone_server.export.apply_bias_shift` applies it.
"""

from __future__ import annotations

import torch
from torch import nn

from backbone_server.deltas.base import DeltaConfig, ProjectedWeights, register_delta
from backbone_server.deltas.exported import Exported, ExportRequest, peft_key, plain_load, store
from backbone_server.deltas.hooks import forward_hooks
from backbone_server.deltas.layout import Layout
from backbone_server.deltas.modules import PROJECTIONS, ModulePlaces, features, find_modules, is_projection, type_names
from backbone_server.errors import InvalidArgument


def _is_norm(module: nn.Module) -> bool:
    return (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")) and isinstance(
        getattr(module, "weight", None), torch.Tensor
    )


def _is_target(module: nn.Module) -> bool:
    return is_projection(module) or _is_norm(module)


@register_delta
class BiasShift(ProjectedWeights):
    name = "bias"
    summary = ("a shift of the output of every biased Linear (or Conv1D) module, or of every norm where there is "
               "none (BitFit)")
    gated_roles = ("bias_shift",)
    peft_type = "BLACKBOX_BIAS"
    base_scale = 0.05

    def __init__(self, config: DeltaConfig, backbone):
        super().__init__(config, backbone)
        body = backbone.body
        if config.targets:
            self.modules = find_modules(body, config.targets, _is_target, f"{PROJECTIONS} or norms")
            self.description = f"shift of the outputs of {len(self.modules)} modules ({', '.join(config.targets)})"
        else:
            biased = [(n, m) for n, m in body.named_modules() if is_projection(m) and m.bias is not None]
            if biased:
                self.modules = biased
                self.description = (f"shift of the bias of each of the {len(biased)} {type_names(biased)} modules "
                                    "with a bias")
            else:
                self.modules = [(n, m) for n, m in body.named_modules() if _is_norm(m)]
                if not self.modules:
                    raise InvalidArgument(f"this model has neither biased {PROJECTIONS} nor norms; "
                                          "name the bias targets explicitly")
                self.description = (f"per-channel shift of the output (normalised hidden state) of each of the "
                                    f"{len(self.modules)} RMSNorm/LayerNorm modules")
        places = ModulePlaces(backbone)
        pieces, scales = [], []
        for _, module in self.modules:
            weight = module.weight.float()
            if is_projection(module):
                width_in, width = features(module)
                factor = weight.std().item() * width_in ** 0.5
            else:
                width = weight.shape[-1]
                factor = weight.pow(2).mean().sqrt().item()
            pieces.append(("bias_shift", places.path(module), (width,), places.layer(module)))
            scales.append(torch.full((width,), config.projection_scale * factor))
        self.layout = Layout.tiled(pieces)
        self._targets = list(zip((module for _, module in self.modules), self.layout))
        self._build_projection(config, backbone.device, scales)

    row_local = True

    def patched(self, params: torch.Tensor, slots: torch.Tensor | None = None, routing=None):
        return forward_hooks(self.row_hooks(params))

    def row_hooks(self, params: torch.Tensor, slots: torch.Tensor | None = None) -> list:
        hooks = []
        for module, segment in self._targets:
            weight = module.weight
            shift = segment.of(params)[:, None].to(device=weight.device, dtype=weight.dtype)  # (p, 1, width)
            hooks.append((module, _shift_hook(shift, params.shape[0])))
        return hooks

    def export_parameters(self, params: torch.Tensor, request: ExportRequest) -> Exported:
        tensors = {peft_key(segment, suffix=""): store(segment.of(params)) for segment in self.layout}
        modules = [segment.module for segment in self.layout]
        adapter = {
            "peft_type": self.peft_type, "task_type": None, "base_model_name_or_path": request.base_model,
            "description": f"{self.description}: adapter_model.safetensors holds, per module, "
                           "'base_model.model.<module path>.bias_shift', a vector added to the module's output "
                           "(for a Linear or Conv1D with a bias, exactly a change of that bias). Not a PEFT type: "
                           "apply it with backbone_server.export.apply_bias_shift(model, folder).",
            "target_modules": modules,
        }
        how = f"{plain_load(request.backbone)}; backbone_server.export.apply_bias_shift(model, THIS_FOLDER)"
        return Exported(self.name, tensors, adapter, how, self.description, modules)


def _shift_hook(shift: torch.Tensor, p: int):
    def hook(module, args, output):
        return (output.reshape(p, -1, output.shape[-1]) + shift).view_as(output)

    return hook
