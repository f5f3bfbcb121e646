"""The memory model: bounds from free memory, and a forward that runs out of memory is
retried in smaller chunks with the same results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbone_server.engine import Engine
from backbone_server.errors import ResourceExhausted
from backbone_server.memory import CPU_BATCH_TOKENS, bytes_per_token, plan_memory
from tests.server.test_engine import make_session, population

GiB = 2**30


def test_the_plan_follows_free_memory_and_caps_a_cpu(tiny_llama):
    roomy = plan_memory(tiny_llama, free_bytes=64 * GiB)
    assert roomy.max_batch_tokens == CPU_BATCH_TOKENS and "capped" in roomy.reason
    inference, gradient = bytes_per_token(tiny_llama.model.config, tiny_llama.dtype, "causal")
    assert gradient > tiny_llama.num_layers * inference / 2  # a backward keeps every layer
    tight = plan_memory(tiny_llama, free_bytes=int(400 * inference * 4))  # 25% of it: 400 tokens
    assert tight.max_batch_tokens == 400
    assert tight.gradient_batch_tokens < tight.max_batch_tokens
    assert "GiB free on cpu" in tight.reason


def test_an_operator_bound_is_kept_and_scaled_for_gradients(tiny_roberta):
    plan = plan_memory(tiny_roberta, requested_tokens=1000)
    assert plan.max_batch_tokens == 1000 and 1 <= plan.gradient_batch_tokens < 1000
    assert "as configured" in plan.reason


def test_masked_models_need_no_cache_memory(tiny_llama, tiny_roberta):
    causal, _ = bytes_per_token(tiny_llama.model.config, torch.float32, "causal")
    masked, _ = bytes_per_token(tiny_llama.model.config, torch.float32, "masked")
    assert masked < causal


def body_with_memory_limit(body, limit_tokens, forwards):
    """The model's body, failing like a full GPU when a forward holds more than `limit_tokens`."""

    def limited(*args, **kwargs):
        inputs = kwargs.get("inputs_embeds")
        if inputs is not None:
            tokens = inputs.shape[0] * inputs.shape[1]
            forwards.append(tokens)
            if tokens > limit_tokens:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return body(*args, **kwargs)

    return limited


@pytest.mark.parametrize("placement", ["before", "after"])
def test_out_of_memory_is_retried_in_halves_with_the_same_scores(tiny_llama, monkeypatch, placement):
    z = population(8)
    plain = Engine(tiny_llama)
    reference = plain.evaluate(make_session(plain, placement).id, "train", z)
    engine = Engine(tiny_llama, max_batch_tokens=4000)
    session = make_session(engine, placement)
    forwards = []
    monkeypatch.setattr(tiny_llama, "body", body_with_memory_limit(tiny_llama.body, 150, forwards))
    scores = engine.evaluate(session.id, "train", z)
    np.testing.assert_allclose(scores.logits, reference.logits, rtol=0, atol=1e-5)
    assert max(forwards) > 150 and engine.max_batch_tokens < 4000  # it did run out, and learned
    forwards.clear()
    engine.evaluate(session.id, "train", z)
    assert max(forwards) <= 150  # the next call starts from the smaller bound


def test_one_candidate_too_large_is_resource_exhausted(tiny_llama, monkeypatch):
    engine = Engine(tiny_llama)
    session = make_session(engine)
    monkeypatch.setattr(tiny_llama, "body", body_with_memory_limit(tiny_llama.body, 5, []))
    with pytest.raises(ResourceExhausted, match="does not fit in device memory"):
        engine.evaluate(session.id, "train", population(2))


def test_other_errors_are_not_mistaken_for_memory(tiny_llama, monkeypatch):
    engine = Engine(tiny_llama)
    session = make_session(engine)

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(tiny_llama, "body", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine.evaluate(session.id, "train", population(2))
