"""Chunks of different sessions merged into one forward (issue 16): the same scores as
each request alone, for every kind on both architectures, mixed kinds in one window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbone_server.deltas import DeltaConfig
from backbone_server.engine import Engine
from backbone_server.tenants import Tenant
from tests.server.threads import released_together

TEXTS = ["a great film", "a bad film", "very good indeed", "not good at all", "the story was fine",
         "music and story both weak", "I loved it", "dull"]
SPLIT = [(text, "", i % 2) for i, text in enumerate(TEXTS)]
KINDS = {
    "prompt-first": (DeltaConfig(kind="prompt", prompt_length=3, intrinsic_dim=6), "{prompt} {text_a} It was {mask}"),
    "prompt-after": (DeltaConfig(kind="prompt", prompt_length=3, intrinsic_dim=6), "{text_a} {prompt} It was {mask}"),
    "prefix": (DeltaConfig(kind="prefix", prompt_length=3, intrinsic_dim=6), "{text_a} It was {prompt} so {mask}"),
    "deep-prompt": (DeltaConfig(kind="deep-prompt", prompt_length=3, intrinsic_dim=6), "{text_a} {prompt} It was {mask}"),
    "lora": (DeltaConfig(kind="lora", prompt_length=0, intrinsic_dim=6), "{text_a} It was {mask}"),
    "bias": (DeltaConfig(kind="bias", prompt_length=0, intrinsic_dim=6), "{text_a} It was {mask}"),
    "adapter": (DeltaConfig(kind="adapter", prompt_length=0, intrinsic_dim=6), "{text_a} It was {mask}"),
    "prompt+lora": (DeltaConfig(kind="prompt+lora", prompt_length=2, intrinsic_dim=6), "{text_a} {prompt} It was {mask}"),
    "unipelt": (DeltaConfig(kind="unipelt:lora+adapter", prompt_length=0, intrinsic_dim=8), "{text_a} It was {mask}"),
    "deep-prompt+bias": (DeltaConfig(kind="deep-prompt+bias", prompt_length=2, intrinsic_dim=6),
                         "{text_a} {prompt} It was {mask}"),
    "deep-prompt+lora": (DeltaConfig(kind="deep-prompt+lora", prompt_length=2, intrinsic_dim=6),
                         "{prompt} {text_a} It was {mask}"),
    "adamix": (DeltaConfig(kind="adamix:lora", prompt_length=0, intrinsic_dim=6), "{text_a} It was {mask}"),
}


def population(seed, size=5, dim=6):
    return np.random.default_rng(seed).normal(size=(size, dim)).astype(np.float32)


def sessions(engine, kinds, copies=2):
    """`copies` sessions of each kind, each its own tenant, with texts of its own."""
    made = []
    for number, name in enumerate(k for k in kinds for _ in range(copies)):
        config, template = KINDS[name]
        # Widths differ by a token from session to session: merged rows are padded.
        texts = [(f"{text}{' more' * (number % 2)}", b, label) for text, b, label in SPLIT]
        tenant = Tenant(f"t{number}")
        session = engine.create_session({"train": texts}, template, ["bad", "great"], config, tenant=tenant)
        made.append((name, tenant, session, population(number, dim=session.delta.z_dim)))
    return made


def alone(backbone, kinds):
    engine = Engine(backbone, batch_window_ms=0)
    return [engine.evaluate(session.id, "train", z, tenant=tenant).logits
            for _, tenant, session, z in sessions(engine, kinds)]


def at_once(engine, made):
    """Each (name, tenant, session, z) of `made` evaluated from its own thread, all
    released together -> their logits, in order (None where a call failed)."""
    return released_together([lambda m=m: engine.evaluate(m[2].id, "train", m[3], tenant=m[1]).logits for m in made])


def together(backbone, kinds, window_ms=200):
    engine = Engine(backbone, batch_window_ms=window_ms, merge_max_tokens=0)
    return at_once(engine, sessions(engine, kinds)), engine


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_roberta"])
def test_mixed_kinds_in_one_window_score_as_each_alone(model, request):
    backbone = request.getfixturevalue(model)
    kinds = list(KINDS)
    want = alone(backbone, kinds)
    got, engine = together(backbone, kinds)
    for name, a, b in zip([k for k in kinds for _ in range(2)], got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    # The soft prompts share forwards (behind their tokens ahead on a causal model); the rest run alone.
    assert engine.merger.merged_chunks >= 4 and engine.scorer.rows_per_forward() > len(TEXTS) * 5


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2", "tiny_roberta"])
def test_soft_prompts_of_many_sessions_share_forwards(model, request):
    backbone = request.getfixturevalue(model)
    kinds = ["prompt-first", "prompt-after"]
    got, engine = together(backbone, kinds * 2)
    want = alone(backbone, kinds * 2)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert engine.merger.merged_chunks >= 4 and engine.scorer.forwards < len(got)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2", "tiny_roberta"])
def test_weight_kinds_of_many_sessions_share_forwards_each_on_its_own_rows(model, request):
    """LoRA, bias, adapters and deep prompts of different sessions in one forward, each
    delta's hooks on its own rows (segment-wise)."""
    backbone = request.getfixturevalue(model)
    kinds = ["lora", "bias", "adapter", "deep-prompt", "prompt-after"]
    got, engine = together(backbone, kinds)
    want = alone(backbone, kinds)
    for name, a, b in zip([k for k in kinds for _ in range(2)], got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    assert engine.merger.merged_chunks >= 6


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2", "tiny_roberta"])
def test_a_deep_prompt_with_a_weight_kind_shares_forwards_its_hooks_of_both_forms_on_its_rows(model, request):
    """A deep prompt's pre-hooks and a weight kind's forward hooks, in one combination,
    beside other sessions' LoRA and deep prompts."""
    backbone = request.getfixturevalue(model)
    kinds = ["deep-prompt+bias", "deep-prompt+lora", "lora", "deep-prompt"]
    got, engine = together(backbone, kinds)
    want = alone(backbone, kinds)
    for name, a, b in zip([k for k in kinds for _ in range(2)], got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    assert engine.merger.merged_chunks >= 5  # more than the plain LoRA and deep-prompt sessions' 4


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_roberta"])
def test_adamix_sessions_share_forwards_each_row_on_its_routed_copy(model, request):
    """On the search split ("train") AdaMix routes each example to a copy: merged, each
    row still gets its own copy's parameters."""
    backbone = request.getfixturevalue(model)
    kinds = ["adamix", "lora"]
    got, engine = together(backbone, kinds)
    want = alone(backbone, kinds)
    for name, a, b in zip([k for k in kinds for _ in range(2)], got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    assert engine.merger.merged_chunks >= 3  # more than the two LoRA sessions


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_prefixes_of_many_sessions_share_forwards_each_over_its_own_virtual_tokens(model, request):
    backbone = request.getfixturevalue(model)
    kinds = ["prefix", "prefix", "prompt-after"]
    got, engine = together(backbone, kinds)
    want = alone(backbone, kinds)
    for name, a, b in zip([k for k in kinds for _ in range(2)], got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    if engine.scorer._shared_attention:  # the model takes shared attention: the prefixes merge in segments
        assert engine.merger.merged_chunks >= 4


def test_a_merged_forward_out_of_memory_runs_each_chunk_alone(tiny_roberta, monkeypatch):
    engine = Engine(tiny_roberta, batch_window_ms=200, merge_max_tokens=0)
    made = sessions(engine, ["prompt-first"], copies=3)
    want = Engine(tiny_roberta, batch_window_ms=0)
    calls = []

    def out_of_memory(chunks):
        calls.append(len(chunks))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.scorer, "forward_merged", out_of_memory)
    results = at_once(engine, made)
    assert calls and all(result is not None for result in results)
    reference = sessions(want, ["prompt-first"], copies=3)
    for result, (_, tenant, session, z) in zip(results, reference):
        np.testing.assert_allclose(result, want.evaluate(session.id, "train", z, tenant=tenant).logits, atol=1e-5)


def test_chunks_of_very_different_widths_do_not_share_a_forward(tiny_roberta):
    """Padding a narrow chunk to a wide one's width would cost more than sharing saves."""
    engine = Engine(tiny_roberta, batch_window_ms=200, merge_max_tokens=0)
    config, template = KINDS["prompt-first"]
    made = []
    for number, words in enumerate((3, 40)):
        tenant = Tenant(f"t{number}")
        texts = [(" ".join(["good"] * words), "", i % 2) for i in range(4)]
        made.append(("prompt-first", tenant, engine.create_session({"train": texts}, template, ["bad", "great"],
                                                                   config, tenant=tenant), population(number)))
    assert all(result is not None for result in at_once(engine, made))
    assert engine.merger.merged_chunks == 0 and engine.scorer.forwards == 2


def test_merged_forwards_hold_at_most_merge_max_tokens(tiny_roberta):
    """A CPU's merged forwards stop at the merge bound."""
    kinds = ["prompt-first"] * 3
    probe = Engine(tiny_roberta, batch_window_ms=0)
    made = sessions(probe, kinds)
    chunk_tokens = len(made[0][3]) * probe.batcher.buckets(made[0][2], "train", 0, made[0][2].select("train", 0, 0),
                                                            probe.bounds.inference).__next__()[0].tokens_per_candidate
    engine = Engine(tiny_roberta, batch_window_ms=200, merge_max_tokens=2 * chunk_tokens)
    at_once(engine, sessions(engine, kinds))
    assert 0 < engine.merger.merged_chunks <= 4  # pairs at most: three chunks never share one forward
    assert engine.scorer.rows_per_forward() <= 2 * len(made[0][3]) * len(TEXTS)
    lone = Engine(tiny_roberta, batch_window_ms=200, merge_max_tokens=chunk_tokens)
    at_once(lone, sessions(lone, kinds))
    assert lone.merger.merged_chunks == 0


def test_a_cpu_engine_merges_up_to_its_merge_bound_and_a_gpu_one_to_memory(tiny_roberta):
    from backbone_server.scheduler import CPU_MERGE_TOKENS

    assert Engine(tiny_roberta).merger.max_tokens == CPU_MERGE_TOKENS
    assert Engine(tiny_roberta, merge_max_tokens=0).merger.max_tokens == 0


def test_a_merged_forward_is_heard_once_with_its_tokens(tiny_roberta):
    """The metrics hear each forward once, where it runs: merged or not, every chunk's
    tokens are counted once."""
    heard = {}
    for window_ms in (0, 200):
        engine = Engine(tiny_roberta, batch_window_ms=window_ms, merge_max_tokens=0)
        tokens = []
        engine.scorer.on_forward = lambda count, bound, seconds: tokens.append(count)
        at_once(engine, sessions(engine, ["prompt-first", "lora"]))
        heard[window_ms] = (sum(tokens), len(tokens), engine.scorer.forwards, engine.merger.merged_chunks)
    assert heard[200][3] > 0 and heard[200][2] < heard[0][2]
    assert heard[200][0] == heard[0][0]
    assert heard[200][1] == heard[200][2] and heard[0][1] == heard[0][2]
