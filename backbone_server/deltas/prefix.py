"""Prefix tuning (Li and Liang 2021; P-tuning v2) from the intrinsic subspace: z generates,
at every layer, the keys and values of `prompt_length` virtual tokens where the template
says {prompt}. They are attended to, never run through the layers.

Per layer l the candidate's parameters hold a "prefix_keys" and a "prefix_values" segment
(kv_heads x n x head_dim each, the model's own cache layout): K_l = K0_l + (its block of
A_l z) and V_l = V0_l + (its block), where K0_l and V0_l are the keys and values the model
itself computes at layer l for p0 (the soft prompt's word tokens, drawn from the session's
seed, framed by the tokenizer's special tokens), and A_l a seeded projection of the whole
z (or, with `per_layer_z`, of layer l's own block of z: BBTv2's layout for divide and
conquer). So z = 0 is the prefix of real tokens, and the prefix moves linearly with z.

Scale: A_l has unit spread times, per coordinate, base_scale * projection_scale times the
spread (standard deviation) of K0_l for the keys and of V0_l for the values: the offsets
are scaled from the model's own keys and values, as the other kinds from their weights,
and base_scale = 0.2 calibrated as theirs are.

Keys are stored as the cache stores them (after any rotary embedding), like PEFT's
prefix: position-free. The engine gives the template's tokens after the prefix the
positions they would have with n real tokens there, so the prefix takes the place of a
soft prompt of the same length.

How the engine runs it (`kv_prompt`): in a causal model the tokens ahead of {prompt} run
once per bucket (they depend on no candidate) and each candidate runs only the tokens
after {prompt}, attending to those tokens' keys and values plus its prefix; with the
prefix after the text that is the template's short tail. In a masked model every token
attends to the prefix and the prefix to nothing: every token runs for every candidate,
at the position it has without the virtual tokens (attention reads them both ways, so
where {prompt} stands makes no difference there).

Export: PEFT's PREFIX_TUNING in a causal model whose template puts the prefix ahead of
the texts, with the keys and values of the template's constant tokens ahead of it (a
BOS) folded in, exact; refused elsewhere with the reason.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from backbone_server.deltas.base import Delta, DeltaConfig, LayerBlocks, register_delta
from backbone_server.deltas.budget import (
    FLOAT_BYTES,
    current_budget,
    delta_bytes_estimate,
    derived_seed,
    reserved_projection,
)
from backbone_server.deltas.exported import Exported, ExportRequest, prefix_tuning
from backbone_server.deltas.layout import Layout
from backbone_server.deltas.modules import ModulePlaces, find_layers
from backbone_server.deltas.soft_prompt import initial_prompt_token_ids
from backbone_server.encoding import special_tokens
from backbone_server.errors import InvalidArgument, shown

LAYER_SEED_STRIDE = 1_000_003  # layer l's projection is drawn with seed + l * stride


@register_delta
class Prefix(LayerBlocks, Delta):
    name = "prefix"
    summary = ("keys and values of prompt_length virtual tokens at every layer (prefix tuning), attended to "
               "where the template says {prompt}, never run")
    takes_prompt = True
    kv_prompt = True
    peft_type = "PREFIX_TUNING"
    per_layer_z = True
    # At the keys' and values' own spread a random z ~ N(0, I) raises SmolLM2's SST-2 train
    # CE from 0.73 to 0.92 on average (up to 1.2); at 0.2 it moves it about as much as BBT's
    # scaling moves a soft prompt (scripts/probe_scale.py; docs/performance.md).
    base_scale = 0.2

    def __init__(self, config: DeltaConfig, backbone):
        super().__init__(config, backbone)
        n = config.prompt_length
        self.initial_token_ids = initial_prompt_token_ids(backbone.tokenizer, backbone.embeddings.weight.shape[0],
                                                          n, config.seed, config.init_text)
        initial = self._initial_states(backbone)  # per layer: (K0, V0), (kv_heads, n, head_dim)
        layers = find_layers(backbone.body, backbone.num_layers)
        self.z_layers = len(layers)
        places = ModulePlaces(backbone)
        shape = tuple(initial[0][0].shape)
        self.layout = Layout.tiled(piece for l, layer in enumerate(layers) for piece in (
            ("prefix_keys", places.path(layer), shape, l), ("prefix_values", places.path(layer), shape, l)))
        width = 2 * initial[0][0].numel()
        config = self.config = self.whole_identity(config, width)
        # The layers' projections, start and scales, checked before any is allocated.
        budget = current_budget()
        budget.check(delta_bytes_estimate(config.projection, config.intrinsic_dim, width, vectors=2,
                                          projections=len(layers)),
                     f"a prefix of {n:,} tokens (D = {width:,} keys and values at each of {len(layers)} layers, "
                     f"each through a {shown(config.projection)} projection from d = {config.intrinsic_dim:,})")
        budget.reserve(2 * self.layout.size * FLOAT_BYTES, f"the start and scales of a {n:,}-token prefix")
        self.start = torch.cat([state.reshape(-1) for pair in initial for state in pair]).float()
        scale = self.base_scale * config.projection_scale
        self.scales = torch.cat([torch.full((state.numel(),), scale * state.float().std().item())
                                 for pair in initial for state in pair]).to(backbone.device)
        self.layer_projections = [
            reserved_projection(config.projection, in_dim=config.intrinsic_dim, out_dim=width,
                                seed=derived_seed(config.seed, l * LAYER_SEED_STRIDE),
                                std=1.0 / config.intrinsic_dim ** 0.5, device=backbone.device)
            for l in range(len(layers))
        ]
        kv_heads, _, head_dim = shape
        self.description = (f"prefix of {n} virtual tokens: keys and values at each of {len(layers)} layers "
                            f"({kv_heads} x {head_dim} per token and layer)"
                            + (", each layer driven by its own block of z" if config.per_layer_z else ""))

    @classmethod
    def note(cls, backbone) -> str:
        if backbone.architecture == "causal":
            return ("each candidate runs only the template's tokens after {prompt}; the tokens ahead of it run "
                    "once per session (with the prefix after the text, only the template's tail is per candidate)")
        return ("a masked model reads the prefix and the text both ways: every token runs for every candidate, "
                "nothing is reused")

    def _initial_states(self, backbone) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The keys and values every layer computes for p0, framed as the tokenizer frames a text."""
        ids = list(self.initial_token_ids)
        ahead, behind = special_tokens(backbone.tokenizer)
        first = len(ahead)
        tokens = torch.tensor([ahead + ids + behind], device=backbone.device)
        cache = DynamicCache(config=backbone.model.config)
        with torch.no_grad():
            backbone.body(input_ids=tokens, attention_mask=torch.ones_like(tokens), cache=cache, use_cache=True)
        states = [(layer.keys[0, :, first:first + len(ids)], layer.values[0, :, first:first + len(ids)])
                  for layer in cache.layers]
        if len(states) != backbone.num_layers:
            raise InvalidArgument(f"this model cached {len(states)} layers of keys and values for "
                                  f"{backbone.num_layers} layers; a prefix needs one per layer")
        return states

    def parameters(self, z: torch.Tensor) -> torch.Tensor:
        offsets = torch.cat([projection(self.layer_z(z, l)) for l, projection in enumerate(self.layer_projections)],
                            dim=1)
        return torch.addcmul(self.start, offsets, self.scales)  # one pass over (P, D), not two

    @property
    def num_parameters(self) -> int:
        return self.layout.size  # keys and values only: no input vectors

    def key_values(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the candidates' (p, kv_heads, n, head_dim) keys and values, in the model's dtype."""
        segments = list(self.layout)
        return [(keys.of(params).to(self.dtype), values.of(params).to(self.dtype))
                for keys, values in zip(segments[::2], segments[1::2])]

    def export(self, z: torch.Tensor, request: ExportRequest) -> Exported:
        backbone, placement = request.backbone, request.placement
        if backbone.architecture != "causal":
            raise InvalidArgument("a prefix exports as PEFT prefix tuning only in a causal model: a masked model's "
                                  "positions and PEFT's differ, and the engine's scores would not be reproduced")
        if placement is None:
            raise InvalidArgument("exporting a prefix needs the run's template, to place it as PEFT does")
        if request.fold_prefix is False:
            raise InvalidArgument("a prefix exports only with the template's tokens ahead of it folded in: PEFT's "
                                  "prefix tuning comes before the whole input; drop --no-fold-prefix")
        ahead = placement["tokens_before_prompt"]
        if ahead is None:
            raise InvalidArgument("the run's template puts text ahead of the prefix; PEFT's prefix tuning comes "
                                  "before the whole input, so only a prefix that precedes the texts exports")
        ahead = list(ahead)
        states = self.key_values(self.parameters(z))  # per layer (1, kv_heads, n, head_dim)
        if ahead:
            ids = torch.tensor([ahead], device=backbone.device)
            cache = backbone.body(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).cache
            states = [(torch.cat([layer.keys, k], dim=2), torch.cat([layer.values, v], dim=2))
                      for layer, (k, v) in zip(cache.layers, states)]
        return prefix_tuning(self.name, states, request, ahead, self.description
                             + (f", after the keys and values of {len(ahead)} folded tokens" if ahead else ""))

