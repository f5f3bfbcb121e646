"""Deep prompts (BBTv2) from the intrinsic subspace: a prompt at the input and at every
layer, all generated from one z.

* Input (layer 0): exactly the soft prompt, p0 + A_0 z (the "prompt" kind with the same
  seed, prompt_length and projection).
* Every deeper layer l = 1 .. num_layers - 1: the hidden states at the prompt slot
  positions entering layer l get A_l z ADDED. BBTv2 (like P-tuning v2) replaces them by
  a layer prompt; here the layer prompt is (the hidden state that would arrive there) +
  A_l z, an additive deep prompt, so that z = 0 is exactly the soft prompt with p0 and
  every layer's prompt moves linearly with z. Each A_l is its own seeded projection (seed
  derived from the session's seed and l).

The deeper layers' offsets are the kind's module parameters: `parameters(z)` is
(P, (num_layers - 1) * prompt_length * hidden), and `patched(params, slots)` adds them
with a forward pre-hook on every layer l >= 1 at the positions that `slots` marks as
prompt slots (candidate-major rows, p * B). The tokens ahead of the prompt are not
touched, so `changes_prefix` is False and causal models keep prefix reuse.

Intrinsic dimension: by default ONE z of intrinsic_dim drives all layers jointly (D =
num_layers * prompt_length * hidden). With `per_layer_z` (BBTv2's layout) every layer l
has its own block z_l of intrinsic_dim coordinates, z = [z_0 | z_1 | ... | z_{L-1}] of
num_layers * intrinsic_dim, the input prompt p0 + A_0 z_0 and layer l's offsets A_l z_l;
`z_blocks` names the blocks ("layer0", ...), so that a client can run BBTv2's
divide-and-conquer: one optimizer per layer, taking turns, the other layers held fixed
(blackbox.optim.blocks).

Scale (BBTv2 sets each layer's projection from the statistics of its hidden states):
A_0 is the soft prompt's, projection_scale * std(embeddings) / sqrt(d). For l >= 1,
std(A_l) = projection_scale * s_l / sqrt(d), where s_l is the spread of the hidden
states entering layer l, measured once when the delta is built on one forward of p0
alone: the median over the prompt positions of each position's standard deviation
across channels (the median keeps an attention-sink position with a few huge channels
from setting the scale).
"""

from __future__ import annotations

import torch
from torch import nn

from backbone_server.deltas.base import Delta, DeltaConfig, forward_hooks, register_delta
from backbone_server.deltas.soft_prompt import SoftPrompt
from backbone_server.errors import InvalidArgument
from backbone_server.projection import make_projection

LAYER_SEED_STRIDE = 1_000_003  # layer l's projection is drawn with seed + l * stride


def find_layers(body: nn.Module, num_layers: int) -> list[nn.Module]:
    """The transformer layers: the first ModuleList of `num_layers` modules in `body`
    (Llama: model.layers; BERT/RoBERTa: encoder.layer)."""
    for _, module in body.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return list(module)
    raise InvalidArgument(f"found no list of {num_layers} layers in this model; deep prompts need one")


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@register_delta("deep-prompt")
class DeepPrompt(Delta):
    changes_prefix = False

    def __init__(self, config: DeltaConfig, backbone):
        self.input = SoftPrompt(config, backbone)  # checks prompt_length, rank, targets
        self.config = config
        self.prompt_length = config.prompt_length
        self.hidden_size = backbone.hidden_size
        self.dtype = backbone.dtype
        self.initial_token_ids = self.input.initial_token_ids
        self.layers = find_layers(backbone.body, backbone.num_layers)[1:]
        self.layer_spread = self._measure_spreads(backbone)
        width = config.prompt_length * backbone.hidden_size
        self.layer_projections = [
            make_projection(
                config.projection,
                in_dim=config.intrinsic_dim,
                out_dim=width,
                seed=config.seed + l * LAYER_SEED_STRIDE,
                std=config.projection_scale * spread / config.intrinsic_dim ** 0.5,
                device=backbone.device,
            )
            for l, spread in enumerate(self.layer_spread, start=1)
        ]
        self.description = (f"deep prompt of {config.prompt_length} vectors at the input and added at the "
                            f"prompt positions entering each of {len(self.layers)} deeper layers"
                            + (", each layer driven by its own block of z" if config.per_layer_z else ""))

    def _measure_spreads(self, backbone) -> list[float]:
        """Per deeper layer, the spread of the hidden states entering it on p0 alone."""
        spreads: list[float] = []

        def record(module, args, kwargs):
            hidden = _hidden_of(args, kwargs).float()
            position_spread = hidden.reshape(-1, hidden.shape[-1]).std(dim=-1)
            spreads.append(position_spread.median().item())

        p0 = self.input.initial_prompt[None].to(self.dtype)
        with torch.no_grad(), forward_hooks([(layer, record) for layer in self.layers], pre=True):
            backbone.body(inputs_embeds=p0, attention_mask=torch.ones(p0.shape[:2], dtype=torch.long,
                                                                      device=p0.device))
        if len(spreads) != len(self.layers) or not all(s > 0 for s in spreads):
            raise InvalidArgument("could not measure the hidden states entering the layers for a deep prompt")
        return spreads

    @property
    def num_parameters(self) -> int:
        return (1 + len(self.layers)) * self.prompt_length * self.hidden_size

    @property
    def z_blocks(self) -> list[tuple[str, int]]:
        d = self.config.intrinsic_dim
        if not self.config.per_layer_z:
            return [("z", d)]
        return [(f"layer{l}", d) for l in range(1 + len(self.layers))]

    def _layer_z(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """The coordinates of z that drive `layer` (0: the input prompt)."""
        if not self.config.per_layer_z:
            return z
        d = self.config.intrinsic_dim
        return z[:, layer * d:(layer + 1) * d]

    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        return self.input.prompts(self._layer_z(z, 0))

    def parameters(self, z: torch.Tensor) -> torch.Tensor:
        if not self.layer_projections:
            return z.new_zeros(z.shape[0], 0)
        return torch.cat([projection(self._layer_z(z, l))
                          for l, projection in enumerate(self.layer_projections, start=1)], dim=1)

    def patched(self, params: torch.Tensor, slots: torch.Tensor | None = None):
        if slots is None:
            raise ValueError("a deep prompt needs the prompt slot positions of the rows")
        p = params.shape[0]
        size, width = slots.shape
        n, h = self.prompt_length, self.hidden_size
        where = slots >= 0
        positions = where.reshape(-1).nonzero().squeeze(1)  # (K,) flat positions of the slots in B * L
        which = slots.reshape(-1)[positions]  # (K,) their slot indices
        hooks = []
        for i, layer in enumerate(self.layers):
            offsets = params[:, i * n * h:(i + 1) * n * h].reshape(p, n, h)[:, which]  # (p, K, h)
            hooks.append((layer, _offset_hook(offsets.to(self.dtype), positions, p, size * width)))
        return forward_hooks(hooks, pre=True)


def _offset_hook(offsets: torch.Tensor, positions: torch.Tensor, p: int, rows: int):
    def hook(module, args, kwargs):
        hidden = _hidden_of(args, kwargs)
        flat = hidden.reshape(p, rows, hidden.shape[-1])
        moved = flat.index_add(1, positions.to(flat.device), offsets.to(flat.device)).view_as(hidden)
        return _with_hidden(args, kwargs, moved)

    return hook
