"""GPT-2 style models, whose projections are transformers' Conv1D (weight stored (in, out))
rather than Linear: tiny-gpt2 loads as a causal model, the weight kinds find and hook its
Conv1D modules (LoRA on c_attn by default, the adapter on the c_proj outputs, BitFit on
the Conv1D biases), z = 0 is the plain model, a batched population equals its candidates
one by one, the prompt kinds work on it, a target that matches nothing is answered with
the names that would, and the exports reproduce the engine (PEFT's LoRA with
fan_in_fan_out, as PEFT wants for Conv1D)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from backbone_server.deltas import build_delta
from backbone_server.deltas.base import DeltaConfig
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument
from backbone_server.export import ADAPTER_CONFIG, apply_adapters, apply_bias_shift, export_delta
from backbone_server.tiny import MAX_LENGTH, build_tiny_gpt2
from tests.server.test_engine import (
    EXAMPLES,
    VERBALIZER,
    assert_population_batches,
    plain_forward_logits,
    population,
    template_for,
)
from tests.server.test_export import DIM, engine_logits, model_logits, random_z
from tests.server.test_prefix import reference_logits
from tests.server.test_weight_deltas import (
    assert_evaluate_leaves_the_model_as_it_was,
    make_weight_session,
    plain_logits,
)

WEIGHT_KINDS = ["lora", "adapter", "bias"]


def plain_ids(example):
    return list(example.before) + list(example.after)


def test_tiny_gpt2_is_a_causal_model_split_at_its_transformer(tiny_gpt2):
    assert tiny_gpt2.architecture == "causal"
    assert tiny_gpt2.body is tiny_gpt2.model.transformer and tiny_gpt2.head is tiny_gpt2.model.lm_head
    assert (tiny_gpt2.num_layers, tiny_gpt2.hidden_size, tiny_gpt2.max_length) == (2, 64, MAX_LENGTH)
    assert any(isinstance(module, Conv1D) for module in tiny_gpt2.body.modules())
    assert not any(isinstance(module, torch.nn.Linear) for module in tiny_gpt2.body.modules())


def test_default_targets(tiny_gpt2):
    config = lambda kind: DeltaConfig(kind, prompt_length=0, intrinsic_dim=DIM)  # noqa: E731
    lora = build_delta(config("lora"), tiny_gpt2)
    assert [name for name, _ in lora.modules] == [f"h.{l}.attn.c_attn" for l in range(2)]
    # c_attn: 64 -> 3 x 64 (query, key and value fused), rank 4.
    assert lora.num_parameters == 2 * 4 * (64 + 192)
    adapter = build_delta(config("adapter"), tiny_gpt2)
    assert [name for name, _ in adapter.modules] == [f"h.{l}.{m}.c_proj" for l in range(2) for m in ("attn", "mlp")]
    assert adapter.num_parameters == 4 * 2 * 8 * 64
    bias = build_delta(config("bias"), tiny_gpt2)  # BitFit: every Conv1D's bias
    assert all(isinstance(module, Conv1D) for _, module in bias.modules) and len(bias.modules) == 2 * 4
    assert "Conv1D" in bias.description and "Conv1D" in lora.description


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_zero_z_is_the_plain_model_and_a_random_z_moves_it(tiny_gpt2, kind):
    engine = Engine(tiny_gpt2)
    session = make_weight_session(engine, kind)
    zero = engine.evaluate(session.id, "train", np.zeros((1, 6), np.float32))
    np.testing.assert_allclose(zero.logits[0], plain_logits(tiny_gpt2, session), rtol=0, atol=1e-6)
    moved = engine.evaluate(session.id, "train", population(1, scale=3.0))
    assert np.abs(moved.logits - zero.logits).max() > 1e-4
    assert_evaluate_leaves_the_model_as_it_was(engine, session)


@pytest.mark.parametrize("max_batch_tokens", [0, 40])
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_batched_population_equals_candidates_one_by_one(tiny_gpt2, kind, max_batch_tokens, monkeypatch):
    engine = Engine(tiny_gpt2, max_batch_tokens=max_batch_tokens)
    session = make_weight_session(engine, kind)
    assert_population_batches(engine, session.id, population(5, scale=2.0), monkeypatch,
                              chunked=max_batch_tokens > 0)


@pytest.mark.parametrize("kind", ["prompt", "deep-prompt"])
def test_prompt_kinds_at_zero_are_the_prompt_of_real_tokens(tiny_gpt2, kind, monkeypatch):
    engine = Engine(tiny_gpt2)
    config = DeltaConfig(kind, prompt_length=4, intrinsic_dim=6, seed=3)
    session = engine.create_session({"train": EXAMPLES}, template_for(tiny_gpt2), VERBALIZER, config)
    zero = engine.evaluate(session.id, "train", np.zeros((1, 6), np.float32))
    np.testing.assert_allclose(zero.logits[0], plain_forward_logits(tiny_gpt2, session), rtol=0, atol=1e-5)
    assert_population_batches(engine, session.id, population(4, scale=2.0), monkeypatch, chunked=False)


@pytest.mark.parametrize("placement", ["before", "after"])
def test_prefix_scores_equal_the_plain_cache_reference(tiny_gpt2, placement):
    """GPT-2's learned positions: the tokens after the prefix take the positions after it."""
    engine = Engine(tiny_gpt2)
    config = DeltaConfig("prefix", prompt_length=3, intrinsic_dim=DIM, seed=3)
    session = engine.create_session({"train": EXAMPLES}, template_for(tiny_gpt2, placement), VERBALIZER, config)
    z = population(3, dim=DIM, scale=2.0)
    np.testing.assert_allclose(engine.evaluate(session.id, "train", z).logits,
                               reference_logits(tiny_gpt2, session, z), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, names", [
    ("lora", "c_attn, c_fc, c_proj"),
    ("bias", "c_attn, c_fc, c_proj, ln_1, ln_2, ln_f"),
    ("adapter", "c_attn"),
])
def test_targets_that_match_nothing_are_answered_with_the_names_that_would(tiny_gpt2, kind, names):
    with pytest.raises(InvalidArgument, match="match no") as caught:
        build_delta(DeltaConfig(kind, prompt_length=0, intrinsic_dim=DIM, targets=("q_proj",)), tiny_gpt2)
    assert names in str(caught.value)
    assert ", 0," not in str(caught.value)  # list indices are not names to target


def test_a_model_without_the_default_targets_names_its_modules(tiny_llama, monkeypatch):
    from backbone_server.deltas import lora

    monkeypatch.setattr(lora, "DEFAULT_TARGETS", (("c_attn",),))
    with pytest.raises(InvalidArgument, match="name the LoRA targets explicitly") as caught:
        build_delta(DeltaConfig("lora", prompt_length=0, intrinsic_dim=DIM), tiny_llama)
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in str(caught.value)


@pytest.mark.parametrize("rank", [0, 2])
def test_lora_export_loads_in_peft_and_reproduces_the_engine(tiny_gpt2, tmp_path, rank):
    peft = pytest.importorskip("peft")
    config = DeltaConfig("lora", prompt_length=0, intrinsic_dim=DIM, seed=3, projection_scale=2.0, rank=rank)
    z = random_z()
    session, expected = engine_logits(tiny_gpt2, config, z)
    manifest = export_delta(tiny_gpt2, config, z, tmp_path / "adapter", base_model="tiny-gpt2")
    assert manifest["reproduces_engine"]
    adapter = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert adapter["fan_in_fan_out"] is True and adapter["target_modules"] == [
        f"transformer.h.{l}.attn.c_attn" for l in range(2)]
    r = rank or 4
    assert manifest["tensors"]["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] == [r, 64]
    assert manifest["tensors"]["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] == [192, r]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(build_tiny_gpt2()[0].eval(), tmp_path / "adapter").eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # PEFT had nothing to correct
    assert len([m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]) == 2
    np.testing.assert_allclose(model_logits(model, session, plain_ids), expected, rtol=0, atol=1e-5)
    # Merged into the (in, out) Conv1D weights (where fan_in_fan_out matters) it scores the same.
    merged = model.merge_and_unload()
    np.testing.assert_allclose(model_logits(merged, session, plain_ids), expected, rtol=0, atol=1e-5)
    plain = model_logits(build_tiny_gpt2()[0].eval(), session, plain_ids)
    assert np.abs(plain - expected).max() > 1e-3


@pytest.mark.parametrize("kind", ["adapter", "bias"])
def test_adapter_and_bias_exports_reproduce_the_engine(tiny_gpt2, tmp_path, kind):
    config = DeltaConfig(kind, prompt_length=0, intrinsic_dim=DIM, seed=3, projection_scale=2.0)
    z = random_z()
    session, expected = engine_logits(tiny_gpt2, config, z)
    manifest = export_delta(tiny_gpt2, config, z, tmp_path / kind)
    assert manifest["reproduces_engine"]
    model = build_tiny_gpt2()[0].eval()
    with (apply_adapters if kind == "adapter" else apply_bias_shift)(model, tmp_path / kind):
        tuned = model_logits(model, session, plain_ids)
    np.testing.assert_allclose(tuned, expected, rtol=0, atol=1e-5)
    assert np.abs(model_logits(model, session, plain_ids) - expected).max() > 1e-3
