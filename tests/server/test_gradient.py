"""The white-box gradient path: refused unless allowed, and equal to finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument, PermissionDenied
from tests.server.test_engine import make_session, population


def central_difference(engine, session, z, direction, loss="ce", eps=1e-2):
    """(L(z + eps u) - L(z - eps u)) / (2 eps) for one candidate, in float64 arithmetic."""
    points = np.stack([z + eps * direction, z - eps * direction]).astype(np.float32)
    scores = engine.evaluate(session.id, "train", points)
    values = (scores.ce_loss if loss == "ce" else scores.hinge_loss).astype(np.float64)
    return (values[0] - values[1]) / (2 * eps)


def assert_gradients_match_finite_differences(engine, session, dim=6):
    """The gradient at a random z agrees with a central difference along a random
    direction, and a population's gradients equal those of its candidates one by one."""
    z = population(1, dim=dim, scale=1.0)[0].astype(np.float64)
    grad = engine.gradient(session.id, "train", z[None, :]).grad[0].astype(np.float64)
    assert np.linalg.norm(grad) > 0
    direction = np.random.default_rng(1).normal(size=dim)
    np.testing.assert_allclose(grad @ direction, central_difference(engine, session, z, direction),
                               rtol=2e-2, atol=1e-4)
    zs = population(3, dim=dim, scale=1.0, seed=5)
    together = engine.gradient(session.id, "train", zs)
    for i in range(3):
        alone = engine.gradient(session.id, "train", zs[i:i + 1])
        np.testing.assert_allclose(together.grad[i], alone.grad[0], rtol=1e-4, atol=1e-6)


def test_gradients_are_refused_unless_allowed(tiny_llama):
    engine = Engine(tiny_llama)
    session = make_session(engine)
    with pytest.raises(PermissionDenied, match="--allow-gradients"):
        engine.gradient(session.id, "train", population(1))


@pytest.mark.parametrize("placement", ["before", "after"])
def test_gradient_matches_finite_differences(tiny_backbone, placement):
    engine = Engine(tiny_backbone, allow_gradients=True)
    session = make_session(engine, placement, dim=6)
    z = population(1, scale=0.5)[0].astype(np.float64)
    result = engine.gradient(session.id, "train", z[None, :])
    grad = result.grad[0].astype(np.float64)
    assert np.linalg.norm(grad) > 0
    rng = np.random.default_rng(1)
    for direction in [*np.eye(6)[:3], *rng.normal(size=(3, 6))]:
        estimate = central_difference(engine, session, z, direction)
        np.testing.assert_allclose(grad @ direction, estimate, rtol=2e-2, atol=1e-4)


def test_the_hinge_gradient_matches_finite_differences(tiny_llama):
    engine = Engine(tiny_llama, allow_gradients=True)
    session = make_session(engine, dim=6)
    z = population(1, scale=3.0, seed=4)[0].astype(np.float64)
    result = engine.gradient(session.id, "train", z[None, :], loss="hinge")
    direction = np.random.default_rng(2).normal(size=6)
    estimate = central_difference(engine, session, z, direction, loss="hinge", eps=1e-3)
    np.testing.assert_allclose(result.grad[0] @ direction, estimate, rtol=2e-2, atol=1e-4)


def test_population_gradients_equal_one_by_one_and_report_the_evaluated_loss(tiny_llama):
    engine = Engine(tiny_llama, allow_gradients=True)
    session = make_session(engine, "after")
    z = population(4)
    together = engine.gradient(session.id, "train", z)
    assert together.grad.shape == (4, 6) and together.num_examples == 5
    for i in range(4):
        alone = engine.gradient(session.id, "train", z[i:i + 1])
        np.testing.assert_allclose(together.grad[i], alone.grad[0], rtol=1e-4, atol=1e-6)
    scores = engine.evaluate(session.id, "train", z)
    np.testing.assert_allclose(together.loss, scores.ce_loss, rtol=0, atol=1e-6)
    np.testing.assert_allclose(together.accuracy, scores.accuracy)


def test_chunked_gradients_equal_unchunked(tiny_roberta):
    whole = Engine(tiny_roberta, allow_gradients=True)
    chunked = Engine(tiny_roberta, allow_gradients=True, max_batch_tokens=40)
    z = population(5)
    a = whole.gradient(make_session(whole).id, "train", z)
    b = chunked.gradient(make_session(chunked).id, "train", z)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_an_example_range_and_a_bad_loss(tiny_llama):
    engine = Engine(tiny_llama, allow_gradients=True)
    session = make_session(engine)
    part = engine.gradient(session.id, "train", population(2), start=1, count=2)
    assert part.num_examples == 2
    with pytest.raises(InvalidArgument, match="unknown loss"):
        engine.gradient(session.id, "train", population(2), loss="mse")
    with pytest.raises(InvalidArgument, match="non-finite"):
        engine.gradient(session.id, "train", np.full((1, 6), np.nan, np.float32))


@pytest.mark.parametrize("placement", ["after", "tail"])
def test_a_gradient_reuses_the_prefix_states_an_evaluate_stored(tiny_llama, placement):
    """The tune loop scores z = 0 (Evaluate) before its first Gradient: the keys and values
    of the text that Evaluate stored serve the gradient path too, with the same result."""
    from tests.server.test_prefix import DIM, prefix_session

    z = population(2, dim=DIM, scale=0.5)
    fresh = Engine(tiny_llama, allow_gradients=True)
    expected = fresh.gradient(prefix_session(fresh, placement).id, "train", z)
    engine = Engine(tiny_llama, allow_gradients=True)
    session = prefix_session(engine, placement)
    assert session.prefix_reuse
    engine.evaluate(session.id, "train", np.zeros((1, DIM), dtype=np.float32))
    after_evaluate = engine.gradient(session.id, "train", z)
    np.testing.assert_allclose(after_evaluate.grad, expected.grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(after_evaluate.loss, expected.loss, rtol=1e-6)
