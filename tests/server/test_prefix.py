"""The prefix kind (keys and values of virtual tokens at every layer) and the engine's path
for it: each candidate runs only the tokens after {prompt} in a causal model. Its scores
equal a reference built one example and one candidate at a time with the plain cache API
of transformers (rotary positions included), batched equals one by one, chunking and
out-of-memory halving change nothing, and z = 0 is the prefix of real tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from backbone_server.deltas import DeltaConfig, build_delta, kind_infos
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument
from tests.server.test_engine import EXAMPLES, VERBALIZER, assert_population_batches, population, template_for
from tests.server.test_gradient import assert_gradients_match_finite_differences
from tests.server.test_memory import body_with_memory_limit

DIM = 6
N = 3


def prefix_session(engine, placement="after", kind="prefix", dim=DIM, seed=3, **delta):
    config = DeltaConfig(kind, prompt_length=N, intrinsic_dim=dim, seed=seed, **delta)
    return engine.create_session({"train": EXAMPLES}, template_for(engine.backbone, placement), VERBALIZER, config)


def reference_logits(backbone, session, z):
    """(P, N, C) verbalizer logits, one example and one candidate at a time: the tokens
    ahead of {prompt} through the model with a cache, the candidate's keys and values
    appended to every layer, then the tokens after {prompt} at the positions after the
    virtual tokens (causal); or every token behind the virtual tokens, at the positions it
    has without them (masked: transformers numbers `inputs_embeds` from the start)."""
    model, causal = backbone.model, backbone.architecture == "causal"
    delta = session.delta
    states = delta.key_values(delta.parameters(torch.tensor(z)))  # per layer (P, kv_heads, n, head_dim)
    out = np.zeros((len(z), len(session.splits["train"]), len(VERBALIZER)), np.float32)
    with torch.no_grad():
        for c in range(len(z)):
            prefix = [(k[c:c + 1], v[c:c + 1]) for k, v in states]
            for i, e in enumerate(session.splits["train"]):
                before, after = list(e.before), list(e.after)
                if causal:
                    past = prefix
                    if before:
                        ahead = model(input_ids=torch.tensor([before]), use_cache=True).cache
                        past = [(torch.cat([layer.keys, k], 2), torch.cat([layer.values, v], 2))
                                for layer, (k, v) in zip(ahead.layers, prefix)]
                    start = len(before) + N
                    logits = model(input_ids=torch.tensor([after]),
                                   cache=DynamicCache(ddp_cache_data=past, config=model.config),
                                   position_ids=torch.arange(start, start + len(after))[None],
                                   attention_mask=torch.ones(1, start + len(after), dtype=torch.long)).logits
                    row = logits[0, e.read - start]
                else:
                    ids = before + after
                    logits = model(inputs_embeds=model.get_input_embeddings()(torch.tensor([ids])),
                                   cache=DynamicCache(ddp_cache_data=prefix, config=model.config),
                                   attention_mask=torch.ones(1, N + len(ids), dtype=torch.long)).logits
                    row = logits[0, e.read - (N if e.read >= len(before) + N else 0)]
                out[c, i] = row[session.verbalizer_ids].numpy()
    return out


@pytest.mark.parametrize("placement", ["before", "after"])
def test_scores_equal_the_plain_cache_reference(tiny_backbone, placement):
    engine = Engine(tiny_backbone)
    session = prefix_session(engine, placement)
    assert session.prefix_reuse == (tiny_backbone.architecture == "causal")
    z = population(3, dim=DIM, scale=2.0)
    scores = engine.evaluate(session.id, "train", z)
    np.testing.assert_allclose(scores.logits, reference_logits(tiny_backbone, session, z), rtol=0, atol=1e-5)
    # The second call reads the cached states of the tokens ahead and must agree too.
    np.testing.assert_allclose(engine.evaluate(session.id, "train", z).logits, scores.logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("placement", ["before", "after"])
@pytest.mark.parametrize("max_batch_tokens", [0, 4])  # a candidate holds only its rows (a token or two each)
def test_batched_equals_one_by_one_and_chunking_changes_nothing(tiny_backbone, placement, max_batch_tokens,
                                                                monkeypatch):
    engine = Engine(tiny_backbone, max_batch_tokens=max_batch_tokens)
    session = prefix_session(engine, placement)
    assert_population_batches(engine, session.id, population(5, dim=DIM, scale=2.0), monkeypatch,
                              chunked=max_batch_tokens > 0)


def test_shared_attention_scores_as_the_cache_path(tiny_llama, monkeypatch):
    """The copy-free attention of the prefix path against the plain cache path it replaces."""
    from backbone_server import attention

    assert attention.supported(tiny_llama)
    shared, copied = Engine(tiny_llama), Engine(tiny_llama)
    monkeypatch.setattr(copied.scorer, "_shared_attention", False)
    for kind, dim in (("prefix", DIM), ("prefix+lora", 2 * DIM)):  # shared and per-candidate tokens ahead
        a, b = prefix_session(shared, kind=kind, dim=dim), prefix_session(copied, kind=kind, dim=dim)
        z = population(4, dim=dim, scale=2.0)
        np.testing.assert_allclose(shared.evaluate(a.id, "train", z).logits, copied.evaluate(b.id, "train", z).logits,
                                   rtol=0, atol=1e-5)
    assert tiny_llama.model.config._attn_implementation == "sdpa"  # switched back after each forward


def test_the_tokens_ahead_computed_per_candidate_score_as_shared(tiny_llama):
    shared, per_candidate = Engine(tiny_llama), Engine(tiny_llama, prefix_reuse=False)
    a, b = prefix_session(shared), prefix_session(per_candidate)
    assert a.prefix_reuse and not b.prefix_reuse
    z = population(4, dim=DIM, scale=2.0)
    np.testing.assert_allclose(per_candidate.evaluate(b.id, "train", z).logits,
                               shared.evaluate(a.id, "train", z).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("placement", ["before", "after"])
def test_out_of_memory_is_retried_in_halves_with_the_same_scores(tiny_backbone, monkeypatch, placement):
    # One candidate's rows: a causal model's tokens after {prompt} (a token or two each
    # after the text), a masked model's whole examples.
    limit = 40 if (tiny_backbone.architecture, placement) == ("causal", "after") else 100
    z = population(8, dim=DIM)
    plain = Engine(tiny_backbone)
    reference = plain.evaluate(prefix_session(plain, placement).id, "train", z)
    engine = Engine(tiny_backbone, max_batch_tokens=4000)
    session = prefix_session(engine, placement)
    forwards = []
    monkeypatch.setattr(tiny_backbone, "body", body_with_memory_limit(tiny_backbone.body, limit, forwards))
    np.testing.assert_allclose(engine.evaluate(session.id, "train", z).logits, reference.logits, rtol=0, atol=1e-5)
    assert max(forwards) > limit and engine.max_batch_tokens < 4000


def test_zero_z_is_the_prefix_of_real_tokens(tiny_backbone):
    delta = build_delta(DeltaConfig("prefix", prompt_length=N, intrinsic_dim=DIM, seed=3), tiny_backbone)
    tokenizer = tiny_backbone.tokenizer
    framed = tokenizer(tokenizer.decode(delta.initial_token_ids), add_special_tokens=True)["input_ids"]
    first = framed.index(delta.initial_token_ids[0])
    assert framed[first:first + N] == delta.initial_token_ids
    cache = DynamicCache(config=tiny_backbone.model.config)
    with torch.no_grad():
        tiny_backbone.model(input_ids=torch.tensor([framed]), cache=cache, use_cache=True)
    zero = delta.key_values(delta.parameters(torch.zeros(1, DIM)))
    for layer, (keys, values) in zip(cache.layers, zero):
        torch.testing.assert_close(keys[0], layer.keys[0, :, first:first + N], rtol=0, atol=1e-6)
        torch.testing.assert_close(values[0], layer.values[0, :, first:first + N], rtol=0, atol=1e-6)
    moved = delta.key_values(delta.parameters(torch.tensor(population(1, dim=DIM))))
    assert all((k - k0).abs().max() > 0 for (k, _), (k0, _) in zip(moved, zero))


def test_per_layer_z_drives_its_own_layer(tiny_llama):
    delta = build_delta(DeltaConfig("prefix", prompt_length=N, intrinsic_dim=DIM, per_layer_z=True), tiny_llama)
    layers = tiny_llama.num_layers
    assert delta.z_blocks == [(f"layer{l}", DIM) for l in range(layers)] and delta.z_dim == DIM * layers
    z = torch.zeros(1, DIM * layers)
    z[0, DIM:2 * DIM] = 1.0  # layer 1's block
    moved, zero = delta.key_values(delta.parameters(z)), delta.key_values(delta.parameters(torch.zeros_like(z)))
    changed = [not torch.equal(m[0], z0[0]) or not torch.equal(m[1], z0[1]) for m, z0 in zip(moved, zero)]
    assert changed == [l == 1 for l in range(layers)]


@pytest.mark.parametrize("kind", ["prefix", "deep-prompt"])
def test_the_identity_projection_over_the_whole_delta_is_one_block_per_layer(tiny_llama, kind):
    """d = D with the identity projection: z is the delta itself, coordinate by coordinate."""
    probe = build_delta(DeltaConfig(kind, prompt_length=N, intrinsic_dim=DIM), tiny_llama)
    size, layers = probe.num_parameters, tiny_llama.num_layers
    delta = build_delta(DeltaConfig(kind, prompt_length=N, intrinsic_dim=size, projection="identity"), tiny_llama)
    assert delta.z_dim == size and len(delta.z_blocks) == layers
    assert delta.num_parameters == size
    z = torch.zeros(1, size)
    z[0, -1] = 1.0  # the last coordinate of the last layer's block
    start = delta.parameters(torch.zeros_like(z))
    moved = delta.parameters(z) - start
    assert torch.count_nonzero(moved) == 1 and moved[0, -1] != 0
    with pytest.raises(InvalidArgument, match="identity"):
        build_delta(DeltaConfig(kind, prompt_length=N, intrinsic_dim=size - 1, projection="identity"), tiny_llama)


def test_a_prefix_combines_with_a_weight_kind(tiny_llama, monkeypatch):
    """lora changes the tokens ahead, so they run per candidate under its hooks; with the
    lora slice at zero the combination scores as the prefix alone (part 0 keeps the seed)."""
    engine = Engine(tiny_llama, max_batch_tokens=6)  # at most one candidate per forward
    combined = prefix_session(engine, kind="prefix+lora", dim=2 * DIM)
    alone = prefix_session(engine)
    assert not combined.prefix_reuse and alone.prefix_reuse
    z = population(3, dim=DIM, scale=2.0)
    with_zero_lora = np.concatenate([z, np.zeros_like(z)], axis=1)
    np.testing.assert_allclose(engine.evaluate(combined.id, "train", with_zero_lora).logits,
                               engine.evaluate(alone.id, "train", z).logits, rtol=0, atol=1e-5)
    moved = np.concatenate([z, population(3, dim=DIM, scale=2.0, seed=7)], axis=1)
    assert np.abs(engine.evaluate(combined.id, "train", moved).logits
                  - engine.evaluate(combined.id, "train", with_zero_lora).logits).max() > 1e-4
    assert_population_batches(engine, combined.id, moved, monkeypatch, chunked=True)


@pytest.mark.parametrize("kind", ["prefix", "prefix+lora"])
def test_gradient_matches_finite_differences(tiny_llama, kind):
    engine = Engine(tiny_llama, allow_gradients=True)
    dim = DIM if kind == "prefix" else 2 * DIM
    assert_gradients_match_finite_differences(engine, prefix_session(engine, kind=kind, dim=dim), dim=dim)


def test_a_causal_template_needs_a_token_after_the_prefix(tiny_llama):
    engine = Engine(tiny_llama)
    with pytest.raises(InvalidArgument, match="no token between"):
        engine.create_session({"train": EXAMPLES}, "{text_a} It was{prompt}{mask}", VERBALIZER,
                              DeltaConfig("prefix", prompt_length=N, intrinsic_dim=DIM))


@pytest.mark.parametrize("kind", ["prompt+prefix", "deep-prompt+prefix", "adamix:prefix"])
def test_what_it_cannot_combine_with_is_refused(tiny_llama, kind):
    with pytest.raises(InvalidArgument, match="at most one prompt-like part|adamix takes one weight kind"):
        build_delta(DeltaConfig(kind, prompt_length=N, intrinsic_dim=2 * DIM), tiny_llama)


def test_getinfo_says_what_it_costs_on_each_architecture(tiny_llama, tiny_roberta):
    causal = {kind.name: kind for kind in kind_infos(tiny_llama)}["prefix"]
    masked = {kind.name: kind for kind in kind_infos(tiny_roberta)}["prefix"]
    assert causal.kv_prompt and causal.per_layer_z and causal.peft_type == "PREFIX_TUNING"
    assert "once per session" in causal.note and "nothing is reused" in masked.note
