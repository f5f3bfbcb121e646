"""A new delta kind is one class and its registration: defined here and nowhere else, it
is listed with its capabilities, scores through the engine, combines with the built-in
kinds under UniPELT gates read from its layout, and is refused by export with a reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbone_server.deltas import DELTA_KINDS, DeltaConfig, build_delta, kind_infos, register_delta
from backbone_server.deltas.base import ProjectedWeights
from backbone_server.deltas.hooks import forward_hooks
from backbone_server.deltas.layout import Layout
from backbone_server.deltas.modules import ModulePlaces, find_layers
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument
from backbone_server.export import materialise
from tests.server.test_engine import assert_population_batches, population
from tests.server.test_weight_deltas import assert_evaluate_leaves_the_model_as_it_was, make_weight_session, plain_logits

DIM = 6


class LayerShift(ProjectedWeights):
    """A shift of every layer's output hidden states, one vector per layer."""

    name = "layer-shift"
    summary = "a shift of every transformer layer's output"
    gated_roles = ("layer_shift",)
    takes_targets = False
    base_scale = 0.05

    def __init__(self, config: DeltaConfig, backbone):
        super().__init__(config, backbone)
        self.layers = find_layers(backbone.body, backbone.num_layers)
        places = ModulePlaces(backbone)
        self.layout = Layout.tiled(("layer_shift", places.path(layer), (self.hidden_size,), l)
                                   for l, layer in enumerate(self.layers))
        self._build_projection(config, backbone.device, [torch.full((self.layout.size,), config.projection_scale)])

    def patched(self, params, slots=None, routing=None):
        p = params.shape[0]

        def shift_by(segment):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                moved = (hidden.reshape(p, -1, hidden.shape[-1]) + segment.of(params)[:, None]).view_as(hidden)
                return (moved, *output[1:]) if isinstance(output, tuple) else moved
            return hook

        return forward_hooks([(layer, shift_by(segment)) for layer, segment in zip(self.layers, self.layout)])


@pytest.fixture
def registered():
    register_delta(LayerShift)
    yield LayerShift
    del DELTA_KINDS[LayerShift.name]


def test_it_is_listed_with_what_it_takes(registered):
    info = {kind.name: kind for kind in kind_infos()}["layer-shift"]
    assert info.gated_roles == ("layer_shift",) and info.mixable and not info.takes_prompt and not info.peft_type
    with pytest.raises(InvalidArgument, match="takes no rank"):
        build_delta(DeltaConfig("layer-shift", prompt_length=0, intrinsic_dim=DIM, rank=2), None)


def test_it_scores_through_the_engine(registered, tiny_backbone, monkeypatch):
    engine = Engine(tiny_backbone, max_batch_tokens=40)
    session = make_weight_session(engine, "layer-shift")
    zero = engine.evaluate(session.id, "train", np.zeros((1, DIM), np.float32))
    np.testing.assert_allclose(zero.logits[0], plain_logits(tiny_backbone, session), rtol=0, atol=1e-5)
    assert not session.prefix_reuse  # it changes every token's path (ProjectedWeights)
    assert_population_batches(engine, session.id, population(5, dim=DIM, scale=2.0), monkeypatch, chunked=True)
    assert_evaluate_leaves_the_model_as_it_was(engine, session)


def test_it_combines_and_is_gated_by_layer(registered, tiny_llama):
    delta = build_delta(DeltaConfig("unipelt:lora+layer-shift", prompt_length=0, intrinsic_dim=4 * DIM), tiny_llama)
    layers = tiny_llama.num_layers
    assert delta.num_gates == 2 * layers and [kind for kind, _ in delta.z_blocks] == ["lora", "layer-shift", "gates"]
    shift = delta.parts[1]
    for segment in shift.layout:  # each layer's shift carries that layer's gate
        gates = delta.gate_index[1][segment.start:segment.stop]
        assert torch.equal(gates, torch.full_like(gates, segment.layer))
    z = torch.tensor(population(2, dim=4 * DIM, scale=2.0))
    first = delta.widths[0]
    g = delta.gates(z)[:, layers:]  # the shift part's gates
    plain = shift.parameters(delta._slice(z, 1))
    for segment in shift.layout:
        torch.testing.assert_close(delta.parameters(z)[:, first + segment.start:first + segment.stop],
                                   plain[:, segment.start:segment.stop] * g[:, segment.layer:segment.layer + 1])


def test_export_refuses_it_with_the_kinds_that_export(registered, tiny_llama):
    config = DeltaConfig("layer-shift", prompt_length=0, intrinsic_dim=DIM)
    with pytest.raises(InvalidArgument, match="cannot be exported; exportable kinds: lora, prompt"):
        materialise(tiny_llama, config, np.zeros(DIM, np.float32))
