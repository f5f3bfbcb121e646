"""BitFit from the intrinsic subspace: every candidate gets its own additive shift of
chosen module outputs, generated from z.

What is shifted (also in each built delta's `description`):

* Models whose Linear modules carry biases (BERT/RoBERTa-like): the output of every
  Linear module of the base model that has a bias (attention query/key/value and output
  projections, the feed-forward layers), i.e. exactly a shift of those bias vectors,
  the BitFit parameters. The LM head is not touched.
* Models without biases (Llama-like): the output of every RMSNorm/LayerNorm of the base
  model (each layer's input_layernorm and post_attention_layernorm and the final norm),
  a per-channel additive shift of the normalised hidden state, i.e. a bias added after
  the norm's weight.

`targets` (module-name suffixes) picks other Linear or norm modules instead; a shift of
a Linear without a bias adds one.

All shifts come from ONE projection of z of size D = sum over targets of their output
width, with no offset, so z = 0 is exactly the base model. While the engine runs a
chunk of p candidates (rows laid out candidate-major, p * B rows), a forward hook adds
the (p, 1, width) shifts to the (p, B * L, width) output by broadcasting.

Scale: the projection is built with unit spread and each target's block multiplied by
projection_scale * std(W) * sqrt(in) for a Linear (about the spread of its output for
unit inputs) and projection_scale * rms(weight) for a norm (the spread of its output).

All these spreads are then multiplied by base_scale = 0.05: shifts are the most
sensitive kind (random z at the full spreads raises SmolLM2's SST-2 train CE from 0.62
to 2.7; at 0.1 still to 0.84).
"""

from __future__ import annotations

import torch
from torch import nn

from backbone_server.deltas.base import (
    ProjectedWeights,
    DeltaConfig,
    check_no_prompt,
    find_modules,
    forward_hooks,
    register_delta,
)
from backbone_server.errors import InvalidArgument


def _is_norm(module: nn.Module) -> bool:
    return (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")) and isinstance(
        getattr(module, "weight", None), torch.Tensor
    )


def _is_target(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_norm(module)


@register_delta("bias")
class BiasShift(ProjectedWeights):
    base_scale = 0.05

    def __init__(self, config: DeltaConfig, backbone):
        check_no_prompt(config)
        if config.rank:
            raise InvalidArgument("delta kind 'bias' takes no rank")
        self.config = config
        self.hidden_size = backbone.hidden_size
        self.dtype = backbone.dtype
        body = backbone.body
        if config.targets:
            self.modules = find_modules(body, config.targets, _is_target, "Linear or norm modules")
            self.description = f"shift of the outputs of {len(self.modules)} modules ({', '.join(config.targets)})"
        else:
            biased = [(n, m) for n, m in body.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
            if biased:
                self.modules = biased
                self.description = f"shift of the bias of each of the {len(biased)} Linear modules with a bias"
            else:
                self.modules = [(n, m) for n, m in body.named_modules() if _is_norm(m)]
                if not self.modules:
                    raise InvalidArgument("this model has neither biased Linear modules nor norms; "
                                          "name the bias targets explicitly")
                self.description = (f"per-channel shift of the output (normalised hidden state) of each of the "
                                    f"{len(self.modules)} RMSNorm/LayerNorm modules")
        self.layout: list[tuple[nn.Module, int, int]] = []  # (module, offset, width)
        scales = []
        offset = 0
        for _, module in self.modules:
            weight = module.weight.float()
            if isinstance(module, nn.Linear):
                width = module.out_features
                factor = weight.std().item() * module.in_features ** 0.5
            else:
                width = weight.shape[-1]
                factor = weight.pow(2).mean().sqrt().item()
            self.layout.append((module, offset, width))
            scales.append(torch.full((width,), config.projection_scale * factor))
            offset += width
        self._build_projection(config, backbone.device, scales)

    def patched(self, params: torch.Tensor, slots: torch.Tensor | None = None):
        p = params.shape[0]
        hooks = []
        for module, offset, width in self.layout:
            weight = module.weight
            shift = params[:, None, offset:offset + width].to(device=weight.device, dtype=weight.dtype)
            hooks.append((module, _shift_hook(shift, p)))
        return forward_hooks(hooks)


def _shift_hook(shift: torch.Tensor, p: int):
    def hook(module, args, output):
        return (output.reshape(p, -1, output.shape[-1]) + shift).view_as(output)

    return hook
