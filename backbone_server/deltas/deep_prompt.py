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

The deeper layers' offsets are the kind's module parameters: one "prompt_offset" segment
(n x h) per layer l >= 1, and `patched(params, slots)` adds them with a forward pre-hook
on every layer l >= 1 at the positions that `slots` marks as prompt slots
(candidate-major rows, p * B). The tokens ahead of the prompt are not touched, so
`changes_prefix` is False and causal models keep prefix reuse.

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

Export: in a causal model whose template puts the prompt ahead of the texts, PEFT's
PREFIX_TUNING (the default there; `fold_prefix`): the prompt's keys and values at every
layer depend on nothing after them, so for one z they are constants, computed here for
(the template's constant tokens ahead of the prompt, then the prompt), which PEFT feeds
as past keys and values. Elsewhere (masked models, a prompt after the text; or with
`fold_prefix` False) blackbox's own BLACKBOX_DEEP_PROMPT, exact everywhere: the input
prompt and every layer's offsets, which `backbone_server.export.apply_deep_prompt` applies.
"""

from __future__ import annotations

import dataclasses

import torch

from backbone_server.deltas.base import Delta, DeltaConfig, LayerBlocks, register_delta
from backbone_server.deltas.budget import (
    FLOAT_BYTES,
    current_budget,
    delta_bytes_estimate,
    derived_seed,
    reserved_projection,
)
from backbone_server.deltas.exported import Exported, ExportRequest, plain_load, prefix_tuning, store, tokens_to_fold
from backbone_server.deltas.hooks import forward_hooks, hidden_of, with_hidden
from backbone_server.deltas.layout import Layout
from backbone_server.deltas.modules import ModulePlaces, find_layers
from backbone_server.deltas.soft_prompt import SoftPrompt
from backbone_server.errors import InvalidArgument, shown

LAYER_SEED_STRIDE = 1_000_003  # layer l's projection is drawn with seed + l * stride
PROMPT_POSITIONS = ("in each encoded row, the n positions len(tokens ahead of {prompt}) .. "
                    "len(tokens ahead of {prompt}) + n - 1")


@register_delta
class DeepPrompt(LayerBlocks, Delta):
    name = "deep-prompt"
    summary = "a soft prompt at {prompt} plus offsets added at the prompt positions entering every layer (BBTv2)"
    takes_prompt = True
    gated_roles = ("prompt_offset",)
    peft_type = "BLACKBOX_DEEP_PROMPT"
    per_layer_z = True

    def __init__(self, config: DeltaConfig, backbone):
        super().__init__(config, backbone)
        layers = find_layers(backbone.body, backbone.num_layers)
        self.layers = layers[1:]
        self.z_layers = len(layers)
        width = config.prompt_length * backbone.hidden_size
        config = self.config = self.whole_identity(config, width)
        # Every layer's projection (the input's too) and p0, checked before any is allocated.
        current_budget().check(
            delta_bytes_estimate(config.projection, config.intrinsic_dim, width, projections=len(layers))
            + width * FLOAT_BYTES,
            f"a deep prompt of {config.prompt_length:,} vectors (D = {width:,} at each of {len(layers)} layers, "
            f"each through a {shown(config.projection)} projection from d = {config.intrinsic_dim:,})")
        self.input = SoftPrompt(dataclasses.replace(config, per_layer_z=False), backbone)
        self.initial_token_ids = self.input.initial_token_ids
        places = ModulePlaces(backbone)
        self.layer_modules = [places.path(layer) for layer in layers]
        self.layout = Layout.tiled(("prompt_offset", self.layer_modules[l], (config.prompt_length, self.hidden_size), l)
                                   for l in range(1, len(layers)))
        self.layer_spread = self._measure_spreads(backbone)
        self.layer_projections = [
            reserved_projection(
                config.projection,
                in_dim=config.intrinsic_dim,
                out_dim=width,
                seed=derived_seed(config.seed, l * LAYER_SEED_STRIDE),
                std=config.projection_scale * spread / config.intrinsic_dim ** 0.5,
                device=backbone.device,
            )
            for l, spread in enumerate(self.layer_spread, start=1)
        ]
        self.description = (f"deep prompt of {config.prompt_length} vectors at the input and added at the "
                            f"prompt positions entering each of {len(self.layers)} deeper layers"
                            + (", each layer driven by its own block of z" if config.per_layer_z else ""))

    @classmethod
    def gate_layers(cls, num_layers: int) -> range:
        return range(1, num_layers)  # the input prompt (layer 0) is not gated

    def _measure_spreads(self, backbone) -> list[float]:
        """Per deeper layer, the spread of the hidden states entering it on p0 alone."""
        spreads: list[float] = []

        def record(module, args, kwargs):
            hidden = hidden_of(args, kwargs).float()
            position_spread = hidden.reshape(-1, hidden.shape[-1]).std(dim=-1)
            spreads.append(position_spread.median().item())

        p0 = self.input.initial_prompt[None].to(self.dtype)
        with torch.no_grad(), forward_hooks([(layer, record) for layer in self.layers], pre=True):
            backbone.body(inputs_embeds=p0, attention_mask=torch.ones(p0.shape[:2], dtype=torch.long,
                                                                      device=p0.device))
        if len(spreads) != len(self.layers) or not all(s > 0 for s in spreads):
            raise InvalidArgument("could not measure the hidden states entering the layers for a deep prompt")
        return spreads

    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        return self.input.prompts(self.layer_z(z, 0))

    def parameters(self, z: torch.Tensor) -> torch.Tensor:
        if not self.layer_projections:
            return z.new_zeros(z.shape[0], 0)
        return torch.cat([projection(self.layer_z(z, l))
                          for l, projection in enumerate(self.layer_projections, start=1)], dim=1)

    row_local = True
    row_hooks_pre = True

    def patched(self, params: torch.Tensor, slots: torch.Tensor | None = None, routing=None):
        return forward_hooks(self.row_hooks(params, slots), pre=True)

    def row_hooks(self, params: torch.Tensor, slots: torch.Tensor | None = None) -> list:
        if slots is None:
            raise ValueError("a deep prompt needs the prompt slot positions of the rows")
        p = params.shape[0]
        size, width = slots.shape
        positions = (slots >= 0).reshape(-1).nonzero().squeeze(1)  # (K,) flat positions of the slots in B * L
        which = slots.reshape(-1)[positions]  # (K,) their slot indices
        hooks = []
        for layer, segment in zip(self.layers, self.layout):
            offsets = segment.of(params)[:, which]  # (p, K, h)
            hooks.append((layer, offset_hook(offsets.to(self.dtype), positions, p, size * width)))
        return hooks

    def export(self, z: torch.Tensor, request: ExportRequest) -> Exported:
        # A masked model reads the prompt and the text both ways, so the prompt's keys and
        # values depend on the text: no prefix holds them.
        ahead = tokens_to_fold(request, "" if request.backbone.architecture == "causal" else
                               "a deep prompt becomes a PEFT prefix only in a causal model, and this one is masked; "
                               "export it without --fold-prefix (blackbox's own format, exact)")
        if ahead is not None:
            return self._export_prefix(z, request, list(ahead))
        backbone = request.backbone
        n = self.prompt_length
        params = self.parameters(z)[0]
        tensors = {"prompt_embeddings": store(self.prompts(z)[0])}
        tensors.update({f"layers.{segment.layer}.prompt_offset": store(segment.of(params)) for segment in self.layout})
        adapter = {
            "peft_type": self.peft_type, "task_type": None, "base_model_name_or_path": request.base_model,
            "num_virtual_tokens": n, "token_dim": backbone.hidden_size,
            "num_layers": len(self.layer_modules), "layer_modules": self.layer_modules,
            "description": f"{self.description}: adapter_model.safetensors holds 'prompt_embeddings' (n x h), the "
                           "input vectors that take the n prompt positions of inputs_embeds (where the template "
                           "says {prompt}), and 'layers.<l>.prompt_offset' (n x h) for l >= 1, added to the "
                           "hidden states at those positions entering layer l (layer_modules[l]). Not a PEFT "
                           "type: build inputs_embeds with backbone_server.export.splice_prompt and add the "
                           "offsets with backbone_server.export.apply_deep_prompt(model, folder, positions).",
        }
        how = (f"{plain_load(backbone)}; encode each row as the template says with "
               f"{n} placeholder ids (any valid id) where {{prompt}} is, at positions P; "
               "with backbone_server.export.apply_deep_prompt(model, THIS_FOLDER, P): "
               "model(inputs_embeds=backbone_server.export.splice_prompt(model, ids, "
               "backbone_server.export.load_prompt(THIS_FOLDER), P), attention_mask=...)")
        prompt = {**(request.placement or {}), "template": request.template, "prompt_length": n,
                  "prompt_positions": PROMPT_POSITIONS}
        return Exported(self.name, tensors, adapter, how, self.description, list(self.layer_modules), prompt=prompt)

    def _export_prefix(self, z: torch.Tensor, request: ExportRequest, ahead: list[int]) -> Exported:
        """The keys and values of (the tokens `ahead`, then the deep prompt) at every layer,
        in the layout of PEFT's prefix-tuning embedding (per layer: keys, then values)."""
        backbone = request.backbone
        device = backbone.embeddings.weight.device
        prompt = self.prompts(z)  # (1, n, h)
        ids = torch.tensor(ahead, dtype=torch.long, device=device)
        embeds = torch.cat([backbone.embeddings(ids)[None].to(prompt), prompt], dim=1)
        n, k = prompt.shape[1], len(ahead)
        slots = torch.tensor([[-1] * k + list(range(n))], device=device)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        with self.patched(self.parameters(z), slots):
            cache = backbone.body(inputs_embeds=embeds, attention_mask=mask, use_cache=True).cache
        return prefix_tuning(self.name, [(layer.keys, layer.values) for layer in cache.layers], request, ahead,
                             f"{self.description}, as the keys and values of a {k + n}-token prefix")


def offset_hook(offsets: torch.Tensor, positions: torch.Tensor, p: int, rows: int):
    """A pre-hook adding each candidate's (p, K, h) `offsets` at the K flat `positions`
    of its `rows` (B * L) of the hidden states."""

    def hook(module, args, kwargs):
        hidden = hidden_of(args, kwargs)
        flat = hidden.reshape(p, rows, hidden.shape[-1])
        moved = flat.index_add(1, positions.to(flat.device), offsets.to(flat.device)).view_as(hidden)
        return with_hidden(args, kwargs, moved)

    return hook
