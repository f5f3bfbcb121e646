"""Adapter and deep-prompt delta kinds: z = 0 is the base model (adapter) or the plain
soft prompt (deep prompt), each candidate of a batched population equals its own
forward, the modules come back untouched, prefix reuse is off for adapters and on (and
exact) for deep prompts, and the gradient path works through the hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbone_server.deltas import build_delta
from backbone_server.deltas.base import DeltaConfig
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument
from tests.server.test_engine import (
    EXAMPLES,
    VERBALIZER,
    assert_batched_equals_one_by_one,
    assert_population_batches,
    plain_forward_logits,
    population,
    template_for,
)
from tests.server.test_gradient import assert_gradients_match_finite_differences, central_difference
from tests.server.test_weight_deltas import assert_evaluate_leaves_the_model_as_it_was, hooks_left, plain_logits

KINDS = ["adapter", "deep-prompt"]
PROMPT_LENGTH = {"adapter": 0, "deep-prompt": 4}


def make_kind_session(engine, kind, dim=6, seed=3, placement="before", template=None, **delta):
    config = DeltaConfig(kind, prompt_length=PROMPT_LENGTH[kind], intrinsic_dim=dim, seed=seed, **delta)
    template = template or template_for(engine.backbone, placement)
    return engine.create_session({"train": EXAMPLES}, template, VERBALIZER, config)


def hooked_modules(delta):
    return len(delta.modules) if hasattr(delta, "modules") else len(delta.layers)


def base_logits(engine, kind, session, placement="before"):
    """What z = 0 must give: the plain model (adapter), the soft prompt p0 (deep prompt)."""
    if kind == "adapter":
        return plain_logits(engine.backbone, session)
    prompt = engine.create_session({"train": EXAMPLES}, template_for(engine.backbone, placement), VERBALIZER,
                                   DeltaConfig("prompt", prompt_length=4, intrinsic_dim=6, seed=3))
    return engine.evaluate(prompt.id, "train", np.zeros((1, 6), np.float32)).logits[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", ["before", "after"])
def test_zero_z_gives_the_base_logits(tiny_backbone, kind, placement):
    engine = Engine(tiny_backbone)
    session = make_kind_session(engine, kind, placement=placement)
    scores = engine.evaluate(session.id, "train", np.zeros((1, 6), np.float32))
    np.testing.assert_allclose(scores.logits[0], base_logits(engine, kind, session, placement), rtol=0, atol=1e-6)
    if kind == "deep-prompt":  # and so an ordinary forward with p0's tokens in the prompt slots
        np.testing.assert_allclose(scores.logits[0], plain_forward_logits(tiny_backbone, session), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_nonzero_z_changes_the_logits(tiny_backbone, kind):
    engine = Engine(tiny_backbone)
    session = make_kind_session(engine, kind)
    zero = engine.evaluate(session.id, "train", np.zeros((1, 6), np.float32))
    moved = engine.evaluate(session.id, "train", population(1, scale=3.0))
    assert np.abs(moved.logits - zero.logits).max() > 1e-4  # zero if z were ignored


def test_deep_prompt_layers_act_beyond_the_input_prompt(tiny_backbone):
    # The same z as a plain soft prompt differs only by the deeper layers' offsets.
    engine = Engine(tiny_backbone)
    deep = make_kind_session(engine, "deep-prompt")
    prompt = engine.create_session({"train": EXAMPLES}, template_for(tiny_backbone), VERBALIZER,
                                   DeltaConfig("prompt", prompt_length=4, intrinsic_dim=6, seed=3))
    z = population(2, scale=3.0)
    np.testing.assert_array_equal(deep.delta.prompts(torch.tensor(z)), prompt.delta.prompts(torch.tensor(z)))
    a = engine.evaluate(deep.id, "train", z).logits
    b = engine.evaluate(prompt.id, "train", z).logits
    assert np.abs(a - b).max() > 1e-4


@pytest.mark.parametrize("max_batch_tokens", [0, 40, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_batched_population_equals_candidates_one_by_one(tiny_backbone, kind, max_batch_tokens, monkeypatch):
    engine = Engine(tiny_backbone, max_batch_tokens=max_batch_tokens)
    session = make_kind_session(engine, kind)
    assert_population_batches(engine, session.id, population(7, scale=2.0), monkeypatch,
                              chunked=max_batch_tokens > 0)


@pytest.mark.parametrize("rank", [0, 3])
def test_adapter_parameter_count(tiny_backbone, rank):
    delta = build_delta(DeltaConfig("adapter", prompt_length=0, intrinsic_dim=6, rank=rank), tiny_backbone)
    m, h = rank or 8, tiny_backbone.hidden_size
    assert delta.size_m == m
    # Two adapted sublayers per layer (attention and feed-forward), each down (m x h) and up (h x m).
    assert len(delta.modules) == 2 * tiny_backbone.num_layers
    assert delta.num_parameters == tiny_backbone.num_layers * 2 * 2 * m * h == delta.projection.out_dim
    assert delta.parameters(torch.zeros(3, 6)).shape == (3, delta.num_parameters)


def test_adapter_default_placement(tiny_llama, tiny_roberta):
    llama = build_delta(DeltaConfig("adapter", prompt_length=0, intrinsic_dim=6), tiny_llama)
    assert [name.split(".", 2)[-1] for name, _ in llama.modules] == ["self_attn", "mlp"] * 2
    roberta = build_delta(DeltaConfig("adapter", prompt_length=0, intrinsic_dim=6), tiny_roberta)
    # Before the residual and LayerNorm: the dense projections, not the *Output modules.
    assert [name.split(".", 3)[-1] for name, _ in roberta.modules] == ["attention.output.dense", "output.dense"] * 2
    assert all(isinstance(module, torch.nn.Linear) for _, module in roberta.modules)


def test_adapter_explicit_targets(tiny_llama):
    delta = build_delta(DeltaConfig("adapter", prompt_length=0, intrinsic_dim=6, rank=2, targets=("mlp",)),
                        tiny_llama)
    assert delta.num_parameters == tiny_llama.num_layers * 2 * 2 * 64


@pytest.mark.parametrize("prompt_length", [1, 4])
def test_deep_prompt_parameter_count(tiny_backbone, prompt_length):
    delta = build_delta(DeltaConfig("deep-prompt", prompt_length=prompt_length, intrinsic_dim=6), tiny_backbone)
    h, layers = tiny_backbone.hidden_size, tiny_backbone.num_layers
    assert delta.num_parameters == layers * prompt_length * h
    z = torch.zeros(3, 6)
    assert delta.prompts(z).shape == (3, prompt_length, h)
    assert delta.parameters(z).shape == (3, (layers - 1) * prompt_length * h)
    assert len(delta.layers) == layers - 1 and all(s > 0 for s in delta.layer_spread)


@pytest.mark.parametrize("kind", KINDS)
def test_modules_are_restored_after_evaluate(tiny_backbone, kind):
    engine = Engine(tiny_backbone)
    session = make_kind_session(engine, kind)
    ordinary = plain_logits if kind == "adapter" else plain_forward_logits  # a forward without hooks
    assert_evaluate_leaves_the_model_as_it_was(engine, session, ordinary)


@pytest.mark.parametrize("kind", KINDS)
def test_modules_are_restored_after_an_exception(tiny_backbone, kind):
    delta = build_delta(DeltaConfig(kind, prompt_length=PROMPT_LENGTH[kind], intrinsic_dim=6), tiny_backbone)
    slots = torch.tensor([[0, 1, 2, 3, -1, -1]])  # one row: the prompt, then two tokens
    with pytest.raises(RuntimeError, match="boom"):
        with delta.patched(delta.parameters(torch.ones(2, 6)), slots):
            assert hooks_left(tiny_backbone) == hooked_modules(delta)
            raise RuntimeError("boom")
    assert hooks_left(tiny_backbone) == 0


def test_adapter_turns_prefix_reuse_off(tiny_llama):
    engine = Engine(tiny_llama, prefix_reuse=True)
    session = make_kind_session(engine, "adapter", placement="after")  # text ahead of the prompt
    assert not session.prefix_reuse
    scores = engine.evaluate(session.id, "train", np.zeros((1, 6), np.float32))
    np.testing.assert_allclose(scores.logits[0], plain_logits(tiny_llama, session), rtol=0, atol=1e-6)
    assert not session.prefix_keys


def test_deep_prompt_keeps_prefix_reuse_and_its_logits(tiny_llama):
    reused = Engine(tiny_llama, prefix_reuse=True)
    plain = Engine(tiny_llama, prefix_reuse=False)
    a = make_kind_session(reused, "deep-prompt", placement="after")
    b = make_kind_session(plain, "deep-prompt", placement="after")
    assert a.prefix_reuse and not b.prefix_reuse
    z = population(5, scale=2.0)
    np.testing.assert_allclose(reused.evaluate(a.id, "train", z).logits, plain.evaluate(b.id, "train", z).logits,
                               rtol=0, atol=1e-5)
    assert a.prefix_keys  # the prefix path really ran


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_finite_differences(tiny_backbone, kind):
    engine = Engine(tiny_backbone, allow_gradients=True)
    session = make_kind_session(engine, kind)
    assert_gradients_match_finite_differences(engine, session)


def test_deep_prompt_gradient_with_prefix_reuse(tiny_llama):
    engine = Engine(tiny_llama, allow_gradients=True)
    session = make_kind_session(engine, "deep-prompt", placement="after")
    assert session.prefix_reuse
    z = population(1, scale=1.0, seed=2)[0].astype(np.float64)
    grad = engine.gradient(session.id, "train", z[None, :]).grad[0].astype(np.float64)
    direction = np.random.default_rng(3).normal(size=6)
    estimate = central_difference(engine, session, z, direction)
    np.testing.assert_allclose(grad @ direction, estimate, rtol=2e-2, atol=1e-4)


def test_adapter_descent_can_start_at_the_base_model(tiny_llama):
    # W_up starts at zero and W_down at a fixed W_d0: the update is linear in z at z = 0.
    engine = Engine(tiny_llama, allow_gradients=True)
    session = make_kind_session(engine, "adapter")
    grad = engine.gradient(session.id, "train", np.zeros((1, 6), np.float32)).grad[0]
    assert np.linalg.norm(grad) > 1e-6


@pytest.mark.parametrize("config, message", [
    (dict(kind="adapter", prompt_length=4), "prompt_length must be 0"),
    (dict(kind="adapter", targets=("nope",)), "match no modules"),
    (dict(kind="deep-prompt", prompt_length=0), "prompt_length >= 1"),
    (dict(kind="deep-prompt", prompt_length=2, rank=2), "no rank or targets"),
])
def test_bad_configs_are_refused(tiny_llama, config, message):
    config = {"prompt_length": 0, **config}
    with pytest.raises(InvalidArgument, match=message):
        build_delta(DeltaConfig(intrinsic_dim=6, **config), tiny_llama)


class _KeywordLayer(torch.nn.Module):
    def forward(self, hidden_states=None, **kwargs):
        return hidden_states


def test_deep_prompt_hook_takes_hidden_states_by_keyword_or_position():
    # Layers get their hidden states as args[0] or kwargs["hidden_states"] depending on
    # the transformers version; the offsets land at the prompt slots either way.
    from backbone_server.deltas.deep_prompt import offset_hook
    from backbone_server.deltas.hooks import forward_hooks

    layer = _KeywordLayer()
    hidden = torch.zeros(2, 3, 4)  # p = 2 candidates x B = 1 row, L = 3, h = 4
    offsets = torch.arange(2 * 1 * 4, dtype=torch.float32).view(2, 1, 4)  # one slot, at position 1
    hook = offset_hook(offsets, torch.tensor([1]), p=2, rows=3)
    expected = torch.zeros(2, 3, 4)
    expected[:, 1] = offsets[:, 0]
    with forward_hooks([(layer, hook)], pre=True):
        torch.testing.assert_close(layer(hidden_states=hidden), expected)
        torch.testing.assert_close(layer(hidden), expected)
    assert not layer._forward_pre_hooks


# ---- per-layer z (BBTv2's layout for divide and conquer) ------------------------------


def test_per_layer_z_has_one_block_per_layer(tiny_backbone):
    shared = build_delta(DeltaConfig("deep-prompt", prompt_length=4, intrinsic_dim=6), tiny_backbone)
    layered = build_delta(DeltaConfig("deep-prompt", prompt_length=4, intrinsic_dim=6, per_layer_z=True),
                          tiny_backbone)
    layers = tiny_backbone.num_layers
    assert shared.z_blocks == [("z", 6)] and shared.z_dim == 6
    assert layered.z_blocks == [(f"layer{l}", 6) for l in range(layers)] and layered.z_dim == 6 * layers
    assert layered.num_parameters == shared.num_parameters


def test_per_layer_z_with_every_block_equal_is_the_shared_z(tiny_backbone):
    # Same seeds, same projections: z_l = z for every layer is exactly the shared-z delta.
    engine = Engine(tiny_backbone)
    shared = make_kind_session(engine, "deep-prompt")
    layered = make_kind_session(engine, "deep-prompt", per_layer_z=True)
    z = population(3, scale=2.0)
    tiled = np.tile(z, (1, tiny_backbone.num_layers))
    np.testing.assert_array_equal(engine.evaluate(layered.id, "train", tiled).logits,
                                  engine.evaluate(shared.id, "train", z).logits)


def test_per_layer_z_blocks_drive_their_own_layer_only(tiny_backbone):
    engine = Engine(tiny_backbone)
    session = make_kind_session(engine, "deep-prompt", per_layer_z=True)
    d, layers = 6, tiny_backbone.num_layers
    z = torch.zeros(1, d * layers)
    z[0, d:2 * d] = 1.0  # layer 1's block
    params = session.delta.parameters(z).reshape(layers - 1, -1)
    assert params[0].abs().max() > 0 and all(params[l].abs().max() == 0 for l in range(1, layers - 1))
    assert torch.equal(session.delta.prompts(z), session.delta.prompts(torch.zeros_like(z)))  # input untouched
    zero = engine.evaluate(session.id, "train", np.zeros((1, d * layers), np.float32)).logits
    assert np.abs(engine.evaluate(session.id, "train", z.numpy()).logits - zero).max() > 1e-4
    with pytest.raises(InvalidArgument, match=rf"\(P, {d * layers}\)"):
        engine.evaluate(session.id, "train", np.zeros((1, d), np.float32))


def test_per_layer_z_population_equals_one_by_one(tiny_backbone):
    engine = Engine(tiny_backbone, max_batch_tokens=40)
    session = make_kind_session(engine, "deep-prompt", per_layer_z=True)
    layers = tiny_backbone.num_layers
    z = np.tile(population(5, scale=2.0), (1, layers)) * np.linspace(0.5, 1.5, 6 * layers, dtype=np.float32)
    assert_batched_equals_one_by_one(engine, session.id, z)


@pytest.mark.parametrize("kind", ["prompt", "lora", "prompt+lora", "unipelt:deep-prompt"])
def test_per_layer_z_is_for_the_deep_prompt_alone(tiny_llama, kind):
    config = DeltaConfig(kind, prompt_length=4 if "prompt" in kind else 0, intrinsic_dim=12, per_layer_z=True)
    with pytest.raises(InvalidArgument, match="per_layer_z"):
        build_delta(config, tiny_llama)


def test_a_combination_reports_its_parts_and_gates_as_blocks(tiny_llama):
    delta = build_delta(DeltaConfig("unipelt:prompt+lora", prompt_length=2, intrinsic_dim=13), tiny_llama)
    gates = tiny_llama.num_layers  # lora is gated per layer, the plain prompt is not
    shared = 13 - gates
    assert delta.z_blocks == [("prompt", shared - shared // 2), ("lora", shared // 2), ("gates", gates)]
    assert delta.z_dim == 13
