"""Generation under a tuned delta (`backbone_server.generation`): at a z that changes
nothing it is the plain model's greedy decoding (transformers' `generate`, tokens and
every step's logits), its first token's logits are the engine's verbalizer logits at
{mask} for every kind, the KV cache runs one forward for the input and one of one token
per new token and equals a recompute of the whole text at every step, a batch gives each
text what it gets alone, sampling is seeded, stop strings cut, bounds are refused, and the
model comes out untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from backbone_server.deltas import DeltaConfig, build_delta
from backbone_server.encoding import TemplateEncoder
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument
from backbone_server.generation import MAX_NEW_TOKENS, Generation, GenerationResult, generate

VERBALIZER = ["bad", "great"]
TEXTS = [
    ("the movie was great and the music was very good", ""),
    ("bad", ""),
    ("one of the best films of the year , really", ""),
]
TEMPLATES = {"before": "{prompt}{text_a} It was {mask}", "after": "{text_a}{prompt} It was {mask}"}
PROMPT_LENGTHS = {"prompt": 3, "deep-prompt": 3, "prefix": 3}
KINDS = ["prompt", "prefix", "deep-prompt", "lora", "adapter", "bias", "prompt+lora", "prefix+lora",
         "deep-prompt+bias", "unipelt:lora+adapter"]
DIM = 8
ATOL = 1e-5


@pytest.fixture(params=["tiny-llama", "tiny-gpt2"])
def causal(request):
    return request.getfixturevalue(request.param.replace("-", "_"))


def prompt_length(kind: str) -> int:
    return max((PROMPT_LENGTHS.get(part, 0) for part in kind.replace("unipelt:", "").split("+")), default=0)


def session_for(engine: Engine, kind: str, placement: str = "before", texts=TEXTS):
    config = DeltaConfig(kind, prompt_length=prompt_length(kind), intrinsic_dim=DIM, seed=3)
    return engine.create_session({"train": [(a, b, 0) for a, b in texts]}, TEMPLATES[placement], VERBALIZER,
                                 config)


def random_z(session, seed: int = 1, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=session.delta.z_dim) * scale).astype(np.float32)


def run(backbone, session, z, texts, max_new_tokens, **options):
    """(results, per step the (B, vocabulary) logits) of one Generation."""
    generation = Generation(backbone, session.delta, session.encoder, z, texts, max_new_tokens, **options)
    logits = [step.clone() for step in generation.steps()]
    return generation.results, logits


def state(backbone) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in backbone.model.state_dict().items()}


def hook_count(backbone) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in backbone.model.modules())


def with_eos(result: GenerationResult) -> list[int]:
    return result.tokens + ([2] if result.finish_reason == "eos" else [])


# ---- 1. z that changes nothing: the plain model's greedy decoding ----------------------------


def assert_equals_hf_greedy(backbone, results, logits, references):
    """Our tokens and every step's logits equal transformers' greedy `generate` (one text at a time)."""
    for row, (result, (tokens, hf_logits)) in enumerate(zip(results, references)):
        eos = backbone.tokenizer.eos_token_id
        expected = tokens[:tokens.index(eos) + 1] if eos in tokens else tokens
        assert with_eos(result) == expected
        for step, hf in enumerate(hf_logits[:len(expected)]):
            np.testing.assert_allclose(logits[step][row].numpy(), hf[0].numpy(), rtol=0, atol=ATOL)


def hf_greedy(model, max_new_tokens, **inputs):
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    new = out.sequences[0, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out.sequences[0]
    return new.tolist(), out.logits


@pytest.mark.parametrize("kind", ["lora", "bias", "adapter", "lora+adapter"])
def test_a_weight_kind_at_zero_is_the_plain_greedy_model(causal, kind):
    engine = Engine(causal)
    session = session_for(engine, kind)
    references = []
    for example in [session.encoder.encode(a, b, 0, False, i) for i, (a, b) in enumerate(TEXTS)]:
        ids = torch.tensor([list(example.before) + list(example.after)])
        references.append(hf_greedy(causal.model, 6, input_ids=ids, attention_mask=torch.ones_like(ids)))
    for z in (None, np.zeros(session.delta.z_dim, np.float32)):
        results, logits = run(causal, session, z, TEXTS, 6)
        assert_equals_hf_greedy(causal, results, logits, references)


@pytest.mark.parametrize("kind", ["prompt", "deep-prompt"])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_a_prompt_kind_at_zero_is_greedy_decoding_with_p0_spliced_in(causal, kind, placement):
    engine = Engine(causal)
    session = session_for(engine, kind, placement)
    p0 = session.delta.prompts(torch.zeros(1, session.delta.z_dim))[0]
    references = []
    for example in [session.encoder.encode(a, b, 0, False, i) for i, (a, b) in enumerate(TEXTS)]:
        embed = causal.embeddings
        with torch.no_grad():
            embeds = torch.cat([embed(torch.tensor(list(example.before), dtype=torch.long)), p0,
                                embed(torch.tensor(list(example.after), dtype=torch.long))])[None]
        references.append(hf_greedy(causal.model, 6, inputs_embeds=embeds,
                                    attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)))
    results, logits = run(causal, session, None, TEXTS, 6)
    assert_equals_hf_greedy(causal, results, logits, references)


# ---- 2. the first token is what the engine scores at {mask} ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", ["before", "after"])
def test_the_first_logits_are_the_engines_verbalizer_logits(causal, kind, placement):
    engine = Engine(causal)
    session = session_for(engine, kind, placement)
    z = random_z(session)
    scores = engine.evaluate(session.id, "train", z[None]).logits[0]  # (N, C)
    _, logits = run(causal, session, z, TEXTS, 1)
    assert len(logits) == 1
    np.testing.assert_allclose(logits[0][:, session.verbalizer_ids].numpy(), scores, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind,extra", [("adamix:lora", {}), ("lora", {"said": True}),
                                        ("deep-prompt", {"said": True}), ("prefix", {"per_layer_z": True})])
def test_mixed_and_reparametrised_deltas_score_as_the_engine_does(tiny_llama, kind, extra):
    """AdaMix merges its copies (as on every split it does not route: "test" here), SAID
    and per-layer z change only how z becomes the delta."""
    engine = Engine(tiny_llama)
    config = DeltaConfig(kind, prompt_length=prompt_length(kind), intrinsic_dim=DIM, seed=3, **extra)
    session = engine.create_session({"test": [(a, b, 0) for a, b in TEXTS]}, TEMPLATES["after"], VERBALIZER, config)
    z = random_z(session)
    scores = engine.evaluate(session.id, "test", z[None]).logits[0]
    _, logits = run(tiny_llama, session, z, TEXTS, 1)
    np.testing.assert_allclose(logits[0][:, session.verbalizer_ids].numpy(), scores, rtol=0, atol=ATOL)


# ---- 3. the KV cache --------------------------------------------------------------------------


def count_forwards(backbone):
    """The token width of every forward of the model's body, from now on (and the handle)."""
    widths = []

    def hook(module, args, kwargs):
        inputs = kwargs.get("inputs_embeds")
        widths.append((inputs if inputs is not None else kwargs["input_ids"]).shape[1])

    return widths, backbone.body.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", ["prompt", "lora", "deep-prompt", "prompt+lora", "prefix"])
def test_n_tokens_take_one_forward_of_the_input_then_one_of_one_token_each(causal, kind):
    engine = Engine(causal)
    session = session_for(engine, kind)
    n = session.delta.prompt_length
    examples = [session.encoder.encode(a, b, 0, False, i) for i, (a, b) in enumerate(TEXTS)]
    widths, handle = count_forwards(causal)
    try:
        results = generate(causal, session.delta, session.encoder, random_z(session), TEXTS, 7, temperature=1.0)
    finally:
        handle.remove()
    assert all(r.finish_reason == "length" and len(r.tokens) == 7 for r in results)
    if session.delta.kv_prompt:
        # The prefix path: the tokens ahead of {prompt}, then those behind the virtual ones.
        assert widths == [max(len(e.before) for e in examples), max(len(e.after) for e in examples)] + [1] * 6
    else:
        assert widths == [max(e.length(n) for e in examples)] + [1] * 6


def recomputed_logits(backbone, session, z, text, tokens) -> torch.Tensor:
    """The logits of the next token after `text`'s input and `tokens`, the whole sequence
    run again without any cache of earlier steps (one text alone, no padding)."""
    delta, model = session.delta, backbone
    example = session.encoder.encode(text[0], text[1], 0, False, 0)
    zt = torch.tensor(z[None])
    params = delta.parameters(zt)
    n = delta.prompt_length
    with torch.inference_mode():
        if delta.kv_prompt:
            before, rows = list(example.before), list(example.after) + list(tokens)
            past = [(k, v) for k, v in delta.key_values(params)]
            with delta.patched(params, torch.full((1, max(len(before), 1)), -1)):
                if before:
                    ahead = model.body(input_ids=torch.tensor([before]), use_cache=True).cache
                    past = [(torch.cat([layer.keys, k], 2), torch.cat([layer.values, v], 2))
                            for layer, (k, v) in zip(ahead.layers, past)]
            start = len(before) + n
            with delta.patched(params, torch.full((1, len(rows)), -1)):
                hidden = model.body(input_ids=torch.tensor([rows]),
                                    cache=DynamicCache(ddp_cache_data=past, config=model.model.config),
                                    position_ids=torch.arange(start, start + len(rows))[None],
                                    attention_mask=torch.ones(1, start + len(rows), dtype=torch.long)
                                    ).last_hidden_state
        else:
            prompt = delta.prompts(zt)[0]
            embed = model.embeddings
            rows = [embed(torch.tensor(list(example.before), dtype=torch.long)), prompt,
                    embed(torch.tensor(list(example.after) + list(tokens), dtype=torch.long))]
            embeds = torch.cat(rows)[None]
            slots = torch.tensor([[-1] * len(example.before) + list(range(n))
                                  + [-1] * (len(example.after) + len(tokens))])
            with delta.patched(params, slots):
                hidden = model.body(inputs_embeds=embeds,
                                    attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).last_hidden_state
        return model.head(hidden[0, -1]).float()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", ["before", "after"])
def test_the_cache_equals_a_full_recompute_at_every_step(causal, kind, placement):
    engine = Engine(causal)
    session = session_for(engine, kind, placement)
    z = random_z(session)
    # Sampled, so that the tokens vary (a random tiny model's greedy choice repeats itself).
    results, logits = run(causal, session, z, TEXTS, 6, temperature=1.5, seed=5)
    for row, (text, result) in enumerate(zip(TEXTS, results)):
        for step in range(len(result.tokens)):
            expected = recomputed_logits(causal, session, z, text, result.tokens[:step])
            np.testing.assert_allclose(logits[step][row].numpy(), expected.numpy(), rtol=0, atol=ATOL)


# ---- 4. batches, sampling, stop strings, EOS --------------------------------------------------


@pytest.mark.parametrize("kind", ["prompt+lora", "prefix", "deep-prompt", "bias"])
def test_a_batch_gives_each_text_what_it_gets_alone(causal, kind):
    engine = Engine(causal)
    texts = TEXTS + [("a terrible film", "")]
    session = session_for(engine, kind, "after", texts)
    z = random_z(session)
    for options in ({}, {"temperature": 1.0, "seed": 11}):
        batch, batch_logits = run(causal, session, z, texts, 8, **options)
        for row, text in enumerate(texts):
            # Text i of a batch samples with seed + i: alone it needs that seed.
            alone_options = {**options, "seed": options["seed"] + row} if options else {}
            [alone], alone_logits = run(causal, session, z, [text], 8, **alone_options)
            assert batch[row] == alone
            for step in range(len(alone.tokens)):
                np.testing.assert_allclose(batch_logits[step][row].numpy(), alone_logits[step][0].numpy(),
                                           rtol=0, atol=ATOL)


def test_sampling_is_seeded(tiny_llama):
    engine = Engine(tiny_llama)
    session = session_for(engine, "prompt+lora")
    z = random_z(session)

    def sample(seed):
        return generate(tiny_llama, session.delta, session.encoder, z, TEXTS[:1], 20, temperature=1.0, seed=seed)[0]

    first = sample(7)
    assert first == sample(7)
    assert len(first.tokens) == 20 and first.finish_reason == "length"
    assert sample(8).tokens != first.tokens
    greedy = generate(tiny_llama, session.delta, session.encoder, z, TEXTS[:1], 20)[0]
    assert greedy.tokens != first.tokens
    # A temperature near 0 is the greedy choice, without overflow.
    assert generate(tiny_llama, session.delta, session.encoder, z, TEXTS[:1], 20, temperature=1e-30,
                    seed=7)[0].tokens == greedy.tokens


def test_stop_strings_cut_the_text_and_end_it(causal):
    engine = Engine(causal)
    session = session_for(engine, "prompt")
    z = random_z(session)
    options = dict(temperature=2.0, seed=3)
    [full] = generate(causal, session.delta, session.encoder, z, TEXTS[:1], 20, **options)
    assert full.finish_reason == "length"
    words = full.text.split()
    assert len(words) >= 6, full.text
    stop = words[4]
    [cut] = generate(causal, session.delta, session.encoder, z, TEXTS[:1], 20, stop=[stop], **options)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert stop not in cut.text
    assert cut.tokens == full.tokens[:len(cut.tokens)] and len(cut.tokens) < 20
    # The first of several stop strings to occur cuts.
    [both] = generate(causal, session.delta, session.encoder, z, TEXTS[:1], 20, stop=["zzz", stop, words[5]],
                      **options)
    assert both == cut
    # A stop string that never occurs changes nothing.
    assert generate(causal, session.delta, session.encoder, z, TEXTS[:1], 20, stop=["zzz"], **options) == [full]


def test_eos_ends_a_text_and_the_others_go_on(tiny_llama):
    engine = Engine(tiny_llama)
    session = session_for(engine, "lora")
    z = random_z(session)
    [greedy] = generate(tiny_llama, session.delta, session.encoder, z, TEXTS[1:2], 5)
    generation = Generation(tiny_llama, session.delta, session.encoder, z, TEXTS, 5)
    generation.eos_ids = {greedy.tokens[0]}  # this text's first token ends it
    for _ in generation.steps():
        pass
    ended = generation.results[1]
    assert ended == GenerationResult("", [], "eos")
    assert all(len(r.tokens) == 5 or r.finish_reason == "eos" for r in generation.results)


# ---- 5. bounds, masked models, the model untouched -------------------------------------------


def test_bounds_are_refused(tiny_llama):
    engine = Engine(tiny_llama)
    session = session_for(engine, "prompt")
    delta, encoder = session.delta, session.encoder
    for bad in (0, 5000, -1, 1.5, True):
        with pytest.raises(InvalidArgument, match=str(MAX_NEW_TOKENS)):
            generate(tiny_llama, delta, encoder, None, TEXTS, bad)
    long_text = " ".join(["the"] * 3500)
    with pytest.raises(InvalidArgument, match=f"max_length of {tiny_llama.max_length}"):
        generate(tiny_llama, delta, encoder, None, [(long_text, "")], 1000)
    assert len(generate(tiny_llama, delta, encoder, None, [(long_text, "")], 2)[0].tokens) == 2
    for options, message in [({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                             ({"stop": [""]}, "stop"), ({"seed": -1}, "seed")]:
        with pytest.raises(InvalidArgument, match=message):
            generate(tiny_llama, delta, encoder, None, TEXTS, 4, **options)
    with pytest.raises(InvalidArgument, match=r"shape \(8,\)"):
        generate(tiny_llama, delta, encoder, np.zeros(3, np.float32), TEXTS, 4)
    with pytest.raises(InvalidArgument, match="non-finite"):
        generate(tiny_llama, delta, encoder, np.full(8, np.inf, np.float32), TEXTS, 4)
    with pytest.raises(InvalidArgument, match="texts"):
        generate(tiny_llama, delta, encoder, None, [], 4)


def test_a_masked_model_is_refused(tiny_roberta):
    config = DeltaConfig("prompt", prompt_length=3, intrinsic_dim=DIM, seed=3)
    delta = build_delta(config, tiny_roberta)
    encoder = TemplateEncoder(tiny_roberta.tokenizer, "{prompt}{text_a} . It was {mask} .", "masked", 3,
                              tiny_roberta.max_length)
    with pytest.raises(InvalidArgument, match="Generate needs a causal model"):
        generate(tiny_roberta, delta, encoder, None, TEXTS, 4)


@pytest.mark.parametrize("kind", ["prompt+lora", "prefix+bias", "deep-prompt", "adapter"])
def test_the_model_is_unchanged_and_unhooked_afterwards_also_after_an_error(tiny_llama, kind):
    engine = Engine(tiny_llama)
    session = session_for(engine, kind)
    before, hooks = state(tiny_llama), hook_count(tiny_llama)
    generate(tiny_llama, session.delta, session.encoder, random_z(session), TEXTS, 5, temperature=1.0)
    assert hook_count(tiny_llama) == hooks

    class Failing(torch.nn.Module):  # raises inside the forward, while the delta's hooks are on
        def forward(self, **inputs):
            raise RuntimeError("the body broke")

    broken = dataclasses.replace(tiny_llama, body=Failing())
    with pytest.raises(RuntimeError, match="the body broke"):
        generate(broken, session.delta, session.encoder, random_z(session), TEXTS, 5)
    assert hook_count(tiny_llama) == hooks
    after = state(tiny_llama)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
