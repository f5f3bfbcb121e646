"""Weight-space delta kinds (lora, bias): z = 0 is the plain model, each candidate of a
batched population equals its own forward, the modules come back untouched, prefix
reuse is off, and the gradient path works through the patched modules."""

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
    assert_population_batches,
    population,
    template_for,
)
from tests.server.test_gradient import assert_gradients_match_finite_differences, central_difference

KINDS = ["lora", "bias"]


def make_weight_session(engine, kind, dim=6, seed=3, template=None, **delta):
    config = DeltaConfig(kind, prompt_length=0, intrinsic_dim=dim, seed=seed, **delta)
    return engine.create_session({"train": EXAMPLES}, template or template_for(engine.backbone), VERBALIZER, config)


def plain_logits(backbone, session):
    """Verbalizer logits of an ordinary forward of each encoded example (no prompt)."""
    rows = []
    for example in session.splits["train"]:
        ids = torch.tensor([list(example.before) + list(example.after)])
        with torch.no_grad():
            logits = backbone.model(input_ids=ids).logits[0, example.read]
        rows.append(logits[session.verbalizer_ids])
    return torch.stack(rows).numpy()


def hooks_left(backbone):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in backbone.model.modules())


def assert_evaluate_leaves_the_model_as_it_was(engine, session, ordinary=None):
    """After scoring a population, no hook is left, no weight changed, and `ordinary` (a
    forward without the engine; default the plain model) scores as it did before."""
    backbone = engine.backbone
    ordinary = ordinary or plain_logits
    before = ordinary(backbone, session)
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    engine.evaluate(session.id, "train", population(3, scale=2.0))
    assert hooks_left(backbone) == 0
    np.testing.assert_array_equal(ordinary(backbone, session), before)
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template", [None, "no prompt"])
def test_zero_z_gives_the_plain_model_logits(tiny_backbone, kind, template):
    engine = Engine(tiny_backbone)
    if template:  # a template without {prompt} is fine for a kind without a prompt
        template = "{text_a} It was {mask}" if tiny_backbone.architecture == "causal" else "{text_a} . It was {mask} ."
    session = make_weight_session(engine, kind, template=template)
    scores = engine.evaluate(session.id, "train", np.zeros((1, 6), np.float32))
    np.testing.assert_allclose(scores.logits[0], plain_logits(tiny_backbone, session), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_nonzero_z_changes_the_logits(tiny_backbone, kind):
    engine = Engine(tiny_backbone)
    session = make_weight_session(engine, kind)
    zero = engine.evaluate(session.id, "train", np.zeros((1, 6), np.float32))
    moved = engine.evaluate(session.id, "train", population(1, scale=3.0))
    assert np.abs(moved.logits - zero.logits).max() > 1e-4  # zero if z were ignored


@pytest.mark.parametrize("max_batch_tokens", [0, 40, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_batched_population_equals_candidates_one_by_one(tiny_backbone, kind, max_batch_tokens, monkeypatch):
    engine = Engine(tiny_backbone, max_batch_tokens=max_batch_tokens)
    session = make_weight_session(engine, kind)
    assert_population_batches(engine, session.id, population(7, scale=2.0), monkeypatch,
                              chunked=max_batch_tokens > 0)


def _lora_size(backbone, rank):
    config = backbone.model.config
    hidden = config.hidden_size
    if backbone.architecture == "causal":  # q_proj: h -> h, v_proj: h -> kv heads * head dim
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        per_layer = rank * (hidden + hidden) + rank * (hidden + config.num_key_value_heads * head_dim)
    else:  # query, value: h -> h
        per_layer = 2 * rank * (hidden + hidden)
    return config.num_hidden_layers * per_layer


@pytest.mark.parametrize("rank", [0, 2])
def test_lora_parameter_count(tiny_backbone, rank):
    delta = build_delta(DeltaConfig("lora", prompt_length=0, intrinsic_dim=6, rank=rank), tiny_backbone)
    assert delta.rank == (rank or 4)
    assert delta.num_parameters == _lora_size(tiny_backbone, rank or 4) == delta.projection.out_dim
    assert len(delta.modules) == 2 * tiny_backbone.num_layers
    assert delta.parameters(torch.zeros(3, 6)).shape == (3, delta.num_parameters)


def test_lora_explicit_targets(tiny_llama):
    delta = build_delta(DeltaConfig("lora", prompt_length=0, intrinsic_dim=6, rank=1, targets=("k_proj", "o_proj")),
                        tiny_llama)
    config = tiny_llama.model.config
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or 64 // config.num_attention_heads)
    assert delta.num_parameters == config.num_hidden_layers * ((64 + kv) + (64 + 64))


def test_bias_parameter_count_and_description(tiny_llama, tiny_roberta):
    llama = build_delta(DeltaConfig("bias", prompt_length=0, intrinsic_dim=6), tiny_llama)
    # Two RMSNorms per layer and the final norm, each 64 wide.
    assert llama.num_parameters == (2 * tiny_llama.num_layers + 1) * 64
    assert "RMSNorm" in llama.description
    roberta = build_delta(DeltaConfig("bias", prompt_length=0, intrinsic_dim=6), tiny_roberta)
    # Per layer: query, key, value, attention output (64 each), intermediate (128), output (64).
    assert roberta.num_parameters == tiny_roberta.num_layers * (5 * 64 + 128)
    assert "bias" in roberta.description
    assert all(module.bias is not None for _, module in roberta.modules)


@pytest.mark.parametrize("kind", KINDS)
def test_modules_are_restored_after_evaluate(tiny_backbone, kind):
    engine = Engine(tiny_backbone)
    assert_evaluate_leaves_the_model_as_it_was(engine, make_weight_session(engine, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_modules_are_restored_after_an_exception(tiny_backbone, kind):
    delta = build_delta(DeltaConfig(kind, prompt_length=0, intrinsic_dim=6), tiny_backbone)
    with pytest.raises(RuntimeError, match="boom"):
        with delta.patched(delta.parameters(torch.ones(2, 6))):
            assert hooks_left(tiny_backbone) == len(delta.modules)
            raise RuntimeError("boom")
    assert hooks_left(tiny_backbone) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_weight_kinds_turn_prefix_reuse_off(tiny_llama, kind):
    engine = Engine(tiny_llama, prefix_reuse=True)
    template = template_for(tiny_llama, "after")  # text ahead of the prompt: reuse would apply
    prompt = engine.create_session({"train": EXAMPLES}, template, VERBALIZER,
                                   DeltaConfig("prompt", prompt_length=4, intrinsic_dim=6))
    assert prompt.prefix_reuse
    session = make_weight_session(engine, kind, template=template)
    assert not session.prefix_reuse
    scores = engine.evaluate(session.id, "train", np.zeros((1, 6), np.float32))
    np.testing.assert_allclose(scores.logits[0], plain_logits(tiny_llama, session), rtol=0, atol=1e-6)
    assert not session.prefix_keys


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_finite_differences(tiny_backbone, kind):
    engine = Engine(tiny_backbone, allow_gradients=True)
    session = make_weight_session(engine, kind)
    assert_gradients_match_finite_differences(engine, session)


@pytest.mark.parametrize("kind", KINDS)
def test_descent_can_start_at_the_base_model(tiny_llama, kind):
    # LoRA's B starts at zero and A at a fixed A0, so the update is linear in z at z = 0:
    # a gradient method starting from the base model has somewhere to go.
    engine = Engine(tiny_llama, allow_gradients=True)
    session = make_weight_session(engine, kind)
    grad = engine.gradient(session.id, "train", np.zeros((1, 6), np.float32)).grad[0]
    assert np.linalg.norm(grad) > 1e-6
    direction = grad / np.linalg.norm(grad)
    estimate = central_difference(engine, session, np.zeros(6), direction.astype(np.float64))
    np.testing.assert_allclose(np.linalg.norm(grad), estimate, rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("config, message", [
    (dict(kind="lora", prompt_length=4), "prompt_length must be 0"),
    (dict(kind="bias", prompt_length=2), "prompt_length must be 0"),
    (dict(kind="lora", targets=("nope",)), "match no Linear"),
    (dict(kind="bias", rank=2), "no rank"),
    (dict(kind="prompt", prompt_length=2, rank=2), "no rank or targets"),
])
def test_bad_weight_configs_are_refused(tiny_llama, config, message):
    config = {"prompt_length": 0, **config}
    with pytest.raises(InvalidArgument, match=message):
        build_delta(DeltaConfig(intrinsic_dim=6, **config), tiny_llama)


@pytest.mark.parametrize("fields, message", [
    (dict(rank=-1), "rank"),
    (dict(targets=("q_proj", "q_proj")), "repeat"),
    (dict(targets=("",)), "non-empty"),
    (dict(targets="q_proj"), "list of module names"),
])
def test_bad_config_fields_are_refused(fields, message):
    with pytest.raises(InvalidArgument, match=message):
        DeltaConfig("lora", prompt_length=0, intrinsic_dim=6, **fields)


def test_targets_become_a_tuple():
    assert DeltaConfig("lora", prompt_length=0, intrinsic_dim=3, targets=["q_proj"]).targets == ("q_proj",)
