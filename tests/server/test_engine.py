"""The engine's numbers: z = 0 is the plain model, batching and chunking change nothing,
prefix reuse changes nothing, and bad input is refused with a clear error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from backbone_server.deltas.base import DeltaConfig
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument, NotFound, ResourceExhausted

EXAMPLES = [
    ("the movie was great and the music was very good", "", 1),
    ("a terrible film", "", 0),
    ("bad", "", 0),
    ("one of the best films of the year , really", "", 1),
    ("not good", "", 0),
]
VERBALIZER = ["bad", "great"]


def template_for(backbone, placement="before"):
    if backbone.architecture == "causal":
        return "{text_a}{prompt} It was {mask}" if placement == "after" else "{prompt}{text_a} It was {mask}"
    return "{prompt}{text_a} . It was {mask} ."


def make_session(engine, placement="before", prompt_length=4, dim=6, seed=3, examples=EXAMPLES, **delta):
    config = DeltaConfig("prompt", prompt_length=prompt_length, intrinsic_dim=dim, seed=seed, **delta)
    return engine.create_session({"train": examples}, template_for(engine.backbone, placement), VERBALIZER, config)


def population(size=5, dim=6, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=(size, dim)) * scale).astype(np.float32)


def plain_forward_logits(backbone, session):
    """Logits of an ordinary forward with p0's real tokens written into the prompt slots."""
    rows = []
    p0 = session.delta.initial_token_ids
    for example in session.splits["train"]:
        ids = torch.tensor([list(example.before) + p0 + list(example.after)])
        with torch.no_grad():
            logits = backbone.model(input_ids=ids).logits[0, example.read]
        rows.append(logits[session.verbalizer_ids])
    return torch.stack(rows).numpy()


def count_chunks(engine, monkeypatch) -> list[int]:
    """From now on, the number of candidates in each forward the engine runs."""
    chunks = []
    original = engine.scorer.score_chunks

    def counted(*args):
        for first, logits in original(*args):
            chunks.append(logits.shape[0])
            yield first, logits

    monkeypatch.setattr(engine.scorer, "score_chunks", counted)
    return chunks


def assert_batched_equals_one_by_one(engine, session_id, z):
    """Scoring the population at once gives each candidate's scores alone (fp32, 1e-5)."""
    batched = engine.evaluate(session_id, "train", z)
    single = [engine.evaluate(session_id, "train", z[i:i + 1]) for i in range(len(z))]
    np.testing.assert_allclose(batched.logits, np.concatenate([s.logits for s in single]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched.ce_loss, np.concatenate([s.ce_loss for s in single]), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(batched.accuracy, np.concatenate([s.accuracy for s in single]))


def assert_population_batches(engine, session_id, z, monkeypatch, chunked: bool):
    """Batched equals one by one, and the whole population runs in one forward (or, when
    `chunked`, the engine's token bound split it into several)."""
    chunks = count_chunks(engine, monkeypatch)
    assert_batched_equals_one_by_one(engine, session_id, z)
    if chunked:
        assert max(chunks) < len(z)
    else:
        assert max(chunks) == len(z)


@pytest.mark.parametrize("placement", ["before", "after"])
def test_zero_z_gives_the_plain_model_logits(tiny_backbone, placement):
    engine = Engine(tiny_backbone)
    session = make_session(engine, placement)
    scores = engine.evaluate(session.id, "train", np.zeros((1, 6), np.float32))
    expected = plain_forward_logits(tiny_backbone, session)
    np.testing.assert_allclose(scores.logits[0], expected, rtol=0, atol=1e-5)


def test_nonzero_z_changes_the_logits(tiny_backbone):
    engine = Engine(tiny_backbone)
    session = make_session(engine)
    zero = engine.evaluate(session.id, "train", np.zeros((1, 6), np.float32))
    moved = engine.evaluate(session.id, "train", population(1, scale=3.0))
    # Zero if z were ignored; how far a random tiny model moves depends on its draw.
    assert np.abs(moved.logits - zero.logits).max() > 1e-4


@pytest.mark.parametrize("max_batch_tokens", [0, 40, 1])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_batched_population_equals_candidates_one_by_one(tiny_backbone, placement, max_batch_tokens):
    engine = Engine(tiny_backbone, max_batch_tokens=max_batch_tokens)
    session = make_session(engine, placement)
    assert_batched_equals_one_by_one(engine, session.id, population(7, scale=2.0))


def test_chunking_really_splits_the_work(tiny_llama, monkeypatch):
    engine = Engine(tiny_llama, max_batch_tokens=40)
    session = make_session(engine)
    chunks = count_chunks(engine, monkeypatch)
    engine.evaluate(session.id, "train", population(7))
    assert len(chunks) > 1 and max(chunks) < 7  # several forwards: the bound was respected


def test_prefix_reuse_gives_the_same_scores_as_full_rows(tiny_llama):
    reuse = Engine(tiny_llama, prefix_reuse=True)
    full = Engine(tiny_llama, prefix_reuse=False)
    with_reuse, without = make_session(reuse, "after"), make_session(full, "after")
    assert with_reuse.prefix_reuse and not without.prefix_reuse
    z = population(6, scale=2.0)
    a = reuse.evaluate(with_reuse.id, "train", z)
    b = full.evaluate(without.id, "train", z)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
    # The second call reads the cached prefix states and must agree too.
    np.testing.assert_allclose(reuse.evaluate(with_reuse.id, "train", z).logits, a.logits, rtol=0, atol=1e-6)
    assert with_reuse.prefix_keys and all(key in reuse.batcher.store for key in with_reuse.prefix_keys)


def test_the_prefix_path_uses_the_current_cache_api(tiny_llama):
    """transformers 5 deprecates `past_key_values` (a FutureWarning on every forward, the
    argument to go in 5.40): the engine passes its prefix states as `cache`."""
    engine = Engine(tiny_llama)
    session = make_session(engine, "after")
    assert session.prefix_reuse
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        engine.evaluate(session.id, "train", population(3))
        engine.evaluate(session.id, "train", population(3))  # from the cached prefix states


def forwards_of_the_body(backbone, monkeypatch) -> list[str]:
    """From now on, which input each of the body's forwards gets ("ids": tokens ahead of
    the prompt, "embeds": candidates' rows)."""
    calls, body = [], backbone.body

    def counted(*args, **kwargs):
        calls.append("ids" if "input_ids" in kwargs else "embeds")
        return body(*args, **kwargs)

    monkeypatch.setattr(backbone, "body", counted)
    return calls


def test_sessions_over_the_same_texts_share_their_prefix_states(tiny_llama, monkeypatch):
    engine = Engine(tiny_llama)
    first, second = make_session(engine, "after"), make_session(engine, "after", seed=5)
    z = population(3)
    calls = forwards_of_the_body(tiny_llama, monkeypatch)
    expected = engine.evaluate(first.id, "train", z).logits
    ahead = calls.count("ids")
    assert ahead >= 1 and engine.batcher.store.misses == ahead
    calls.clear()
    other = engine.evaluate(second.id, "train", z)  # another session (and seed), the same texts
    assert "ids" not in calls and engine.batcher.store.hits == ahead
    assert second.prefix_keys == first.prefix_keys
    third = Engine(tiny_llama, prefix_reuse=False)  # the states are the model's, whoever computed them
    np.testing.assert_allclose(other.logits, third.evaluate(make_session(third, "after", seed=5).id, "train", z).logits,
                               rtol=0, atol=1e-5)
    assert f"{ahead} hits" in engine.cache_report()
    np.testing.assert_allclose(engine.evaluate(first.id, "train", z).logits, expected, rtol=0, atol=1e-6)


def test_a_candidate_scored_again_on_the_same_examples_is_not_recomputed(tiny_llama, monkeypatch):
    engine = Engine(tiny_llama)
    session = make_session(engine)
    z = population(1)
    once = engine.evaluate(session.id, "train", z, start=1)
    calls = forwards_of_the_body(tiny_llama, monkeypatch)
    again = engine.evaluate(session.id, "train", z.copy(), start=1)
    assert calls == [] and engine.memo_hits == 1
    np.testing.assert_array_equal(again.logits, once.logits)
    engine.evaluate(session.id, "train", z, start=2)  # other examples: scored
    engine.evaluate(session.id, "train", z + 1e-3, start=1)  # another z: scored
    assert calls.count("embeds") == 2 and engine.memo_hits == 1


def test_the_best_of_a_population_is_not_projected_again(tiny_llama, monkeypatch):
    engine = Engine(tiny_llama)
    session = make_session(engine, dim=6)
    z = population(5)
    whole = engine.evaluate(session.id, "train", z)
    projections = []
    prompts = session.delta.prompts
    monkeypatch.setattr(session.delta, "prompts", lambda zs: projections.append(len(zs)) or prompts(zs))
    alone = engine.evaluate(session.id, "train", z[3:4])
    assert projections == []
    np.testing.assert_allclose(alone.logits[0], whole.logits[3], rtol=0, atol=1e-6)
    engine.evaluate(session.id, "train", population(1, seed=9))
    assert projections == [1]


def test_masked_models_never_reuse_a_prefix(tiny_roberta):
    session = make_session(Engine(tiny_roberta), "after")
    assert not session.prefix_reuse


def test_example_range_scores_only_those_examples(tiny_llama):
    engine = Engine(tiny_llama)
    session = make_session(engine)
    z = population(3)
    whole = engine.evaluate(session.id, "train", z)
    part = engine.evaluate(session.id, "train", z, start=1, count=3)
    assert part.logits.shape == (3, 3, 2)
    np.testing.assert_allclose(part.logits, whole.logits[:, 1:4], rtol=0, atol=1e-5)


def test_losses_and_accuracy_follow_the_logits(tiny_llama):
    engine = Engine(tiny_llama)
    session = make_session(engine)
    scores = engine.evaluate(session.id, "train", population(4, scale=2.0))
    labels = np.array([e[2] for e in EXAMPLES])
    logits = scores.logits.astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -log_softmax[:, np.arange(len(labels)), labels].mean(1)
    np.testing.assert_allclose(scores.ce_loss, ce, rtol=1e-5)
    accuracy = (logits.argmax(-1) == labels).mean(1)
    np.testing.assert_allclose(scores.accuracy, accuracy)
    true = logits[:, np.arange(len(labels)), labels]
    other = logits[:, np.arange(len(labels)), 1 - labels]
    np.testing.assert_allclose(scores.hinge_loss, np.maximum(0, 1 + other - true).mean(1), rtol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (np.full((2, 6), np.nan, np.float32), "non-finite"),
    (np.array([[0, 0, np.inf, 0, 0, 0]], np.float32), "non-finite"),
    (np.zeros((2, 5), np.float32), "shape"),
    (np.zeros((0, 6), np.float32), "shape"),
    (np.zeros(6, np.float32), "shape"),
])
def test_bad_populations_are_refused(tiny_llama, bad, message):
    engine = Engine(tiny_llama)
    session = make_session(engine)
    with pytest.raises(InvalidArgument, match=message):
        engine.evaluate(session.id, "train", bad)


def test_unknown_session_and_split(tiny_llama):
    engine = Engine(tiny_llama)
    with pytest.raises(NotFound, match="no session"):
        engine.evaluate("nope", "train", population(1))
    session = make_session(engine)
    with pytest.raises(NotFound, match="no split 'test'"):
        engine.evaluate(session.id, "test", population(1))
    engine.close_session(session.id)
    with pytest.raises(NotFound):
        engine.evaluate(session.id, "train", population(1))


def test_session_limit(tiny_llama):
    engine = Engine(tiny_llama, max_sessions=1)
    make_session(engine)
    with pytest.raises(ResourceExhausted):
        make_session(engine)


@pytest.mark.parametrize("splits, message", [
    ({}, "at least one split"),
    ({"train": []}, "empty"),
    ({"train": [("fine", "", 5)]}, "label 5"),
])
def test_bad_sessions_are_refused(tiny_llama, splits, message):
    engine = Engine(tiny_llama)
    config = DeltaConfig("prompt", prompt_length=2, intrinsic_dim=3)
    with pytest.raises(InvalidArgument, match=message):
        engine.create_session(splits, "{text_a} It was {mask}", VERBALIZER, config)


def test_text_longer_than_the_model_is_refused_or_truncated(tiny_roberta):
    engine = Engine(tiny_roberta)
    long_text = " ".join(["good"] * (tiny_roberta.max_length + 100))
    config = DeltaConfig("prompt", prompt_length=4, intrinsic_dim=3)
    with pytest.raises(InvalidArgument, match=f"more than the model's {tiny_roberta.max_length}"):
        engine.create_session({"train": [(long_text, "", 1)]}, "{text_a} It was {mask}", VERBALIZER, config)
    session = engine.create_session({"train": [(long_text, "", 1)]}, "{text_a} It was {mask}", VERBALIZER,
                                    config, truncate=True)
    assert session.truncated_examples == 1
    assert session.splits["train"][0].length(4) == tiny_roberta.max_length
    scores = engine.evaluate(session.id, "train", np.zeros((1, 3), np.float32))
    assert np.isfinite(scores.ce_loss).all()


def test_unknown_delta_and_projection(tiny_llama):
    engine = Engine(tiny_llama)
    with pytest.raises(InvalidArgument, match="unknown delta kind"):
        engine.create_session({"train": EXAMPLES}, "{text_a} It was {mask}", VERBALIZER,
                              DeltaConfig("lora-xl", prompt_length=2, intrinsic_dim=3))
    with pytest.raises(InvalidArgument, match="unknown projection"):
        engine.create_session({"train": EXAMPLES}, "{text_a} It was {mask}", VERBALIZER,
                              DeltaConfig("prompt", prompt_length=2, intrinsic_dim=3, projection="fourier"))


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), -1.0])
def test_a_projection_scale_that_is_not_finite_and_positive_is_refused(scale):
    """inf once slipped through and made every loss NaN (issue 15, defect 7)."""
    with pytest.raises(InvalidArgument, match="projection_scale must be finite and > 0"):
        DeltaConfig("lora", prompt_length=0, intrinsic_dim=3, projection_scale=scale)


def test_a_class_of_several_words_scores_their_probabilities_summed(tiny_backbone):
    """["bad", "great|good"]: class 1's logit is logsumexp of "great"'s and "good"'s, the
    logits the single-word sessions give, and the losses follow from those class logits."""
    import torch

    engine = Engine(tiny_backbone)
    config = DeltaConfig("prompt", prompt_length=4, intrinsic_dim=6, seed=3)
    template = template_for(tiny_backbone, "before")

    def logits(verbalizer):
        session = engine.create_session({"train": EXAMPLES}, template, verbalizer, config)
        return engine.evaluate(session.id, "train", population(3)), session

    (great, _), (good, _) = logits(["bad", "great"]), logits(["bad", "good"])
    both, session = logits(["bad", "great|good"])
    assert session.num_classes == 2 and session.word_classes.tolist() == [0, 1, 1]
    np.testing.assert_allclose(both.logits[..., 0], great.logits[..., 0], rtol=1e-6)
    expected = np.logaddexp(great.logits[..., 1], good.logits[..., 1])
    np.testing.assert_allclose(both.logits[..., 1], expected, rtol=1e-5, atol=1e-6)
    labels = torch.tensor([e[2] for e in EXAMPLES])
    ce = torch.nn.functional.cross_entropy(torch.tensor(both.logits).reshape(-1, 2), labels.repeat(3),
                                           reduction="none").reshape(3, -1).mean(1)
    np.testing.assert_allclose(both.ce_loss, ce.numpy(), rtol=1e-5)
