"""Combined delta kinds ("a+b"), UniPELT gates ("unipelt:a+b") and AdaMix ("adamix:kind"):
z = 0 is the base model (or the plain soft prompt p0), batched equals one by one, each
part gets exactly its slice of z, the gates act per candidate, AdaMix routes the search
split deterministically and merges the copies elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbone_server.deltas import build_delta
from backbone_server.deltas.base import DeltaConfig, Routing
from backbone_server.deltas.combined import PART_SEED_STRIDE
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument
from tests.server.test_engine import (
    EXAMPLES,
    VERBALIZER,
    assert_population_batches,
    population,
    template_for,
)
from tests.server.test_gradient import assert_gradients_match_finite_differences
from tests.server.test_weight_deltas import plain_logits

DIM = 12
COMBOS = ["prompt+lora", "lora+adapter+bias", "unipelt:lora+adapter+bias", "unipelt:prompt+lora"]


def prompt_length(kind):
    return 4 if "prompt" in kind else 0


def make_session(engine, kind, dim=DIM, seed=3, splits=None):
    config = DeltaConfig(kind, prompt_length=prompt_length(kind), intrinsic_dim=dim, seed=seed)
    return engine.create_session(splits or {"train": EXAMPLES}, template_for(engine.backbone), VERBALIZER, config)


def zero_logits(engine, kind, session):
    """What z = 0 must give: the plain model, or the prompt kind's p0 for prompt combos."""
    if "deep-prompt" in kind or "prompt" in kind.split(":")[-1].split("+"):
        prompt = make_session(engine, "prompt", dim=6)
        return engine.evaluate(prompt.id, "train", np.zeros((1, 6), np.float32)).logits[0]
    return plain_logits(engine.backbone, session)


@pytest.mark.parametrize("kind", COMBOS + ["deep-prompt+lora", "adamix:lora", "adamix2:adapter"])
def test_zero_z_gives_the_base_logits(tiny_backbone, kind):
    engine = Engine(tiny_backbone)
    session = make_session(engine, kind)
    zero = np.zeros((1, DIM), np.float32)
    np.testing.assert_allclose(engine.evaluate(session.id, "train", zero).logits[0],
                               zero_logits(engine, kind, session), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", COMBOS + ["deep-prompt+lora", "adamix:lora"])
def test_nonzero_z_changes_the_logits(tiny_backbone, kind):
    engine = Engine(tiny_backbone)
    session = make_session(engine, kind)
    zero = engine.evaluate(session.id, "train", np.zeros((1, DIM), np.float32))
    moved = engine.evaluate(session.id, "train", population(1, dim=DIM, scale=3.0))
    assert np.abs(moved.logits - zero.logits).max() > 1e-4  # zero if z were ignored


@pytest.mark.parametrize("max_batch_tokens", [0, 40])
@pytest.mark.parametrize("kind", ["prompt+lora", "lora+adapter+bias", "unipelt:deep-prompt+lora",
                                  "unipelt:lora+adapter+bias", "adamix:lora"])
def test_batched_population_equals_candidates_one_by_one(tiny_backbone, kind, max_batch_tokens, monkeypatch):
    engine = Engine(tiny_backbone, max_batch_tokens=max_batch_tokens)
    session = make_session(engine, kind)
    assert_population_batches(engine, session.id, population(5, dim=DIM, scale=2.0), monkeypatch,
                              chunked=max_batch_tokens > 0)


@pytest.mark.parametrize("kind", ["prompt+lora", "lora+adapter+bias", "deep-prompt+lora", "adamix3:bias"])
def test_parameter_counts_are_the_sum_of_the_parts(tiny_backbone, kind):
    delta = build_delta(DeltaConfig(kind, prompt_length=prompt_length(kind), intrinsic_dim=DIM), tiny_backbone)
    if kind.startswith("adamix"):
        assert delta.num_parameters == 3 * build_delta(DeltaConfig("bias", 0, DIM), tiny_backbone).num_parameters
        return
    parts = kind.split("+")
    alone = [build_delta(DeltaConfig(k, prompt_length=prompt_length(k), intrinsic_dim=4), tiny_backbone)
             for k in parts]
    assert delta.num_parameters == sum(d.num_parameters for d in alone)
    assert sum(delta.dims) == DIM and delta.dims == [DIM // len(parts) + DIM % len(parts)] + [DIM // len(parts)] * (
        len(parts) - 1)


def test_uneven_split_gives_the_remainder_to_the_first_part(tiny_llama):
    delta = build_delta(DeltaConfig("lora+adapter+bias", 0, 8), tiny_llama)
    assert delta.dims == [4, 2, 2]


def test_each_part_gets_exactly_its_slice(tiny_backbone):
    engine = Engine(tiny_backbone)
    session = make_session(engine, "lora+adapter+bias")
    delta = session.delta
    z = population(3, dim=DIM, scale=2.0)
    # The parameters are each part (its own seed) on its own slice of z.
    expected = []
    for i, kind in enumerate(["lora", "adapter", "bias"]):
        alone = build_delta(DeltaConfig(kind, 0, 4, seed=3 + i * PART_SEED_STRIDE), tiny_backbone)
        expected.append(alone.parameters(torch.tensor(z[:, 4 * i:4 * i + 4])))
    torch.testing.assert_close(delta.parameters(torch.tensor(z)), torch.cat(expected, dim=1), rtol=0, atol=0)
    # And through the engine: z nonzero only in the adapter's slice is the adapter alone.
    only = np.zeros_like(z)
    only[:, 4:8] = z[:, 4:8]
    adapter = engine.create_session({"train": EXAMPLES}, template_for(tiny_backbone), VERBALIZER,
                                    DeltaConfig("adapter", 0, 4, seed=3 + PART_SEED_STRIDE))
    np.testing.assert_allclose(engine.evaluate(session.id, "train", only).logits,
                               engine.evaluate(adapter.id, "train", z[:, 4:8]).logits, rtol=0, atol=1e-5)


def test_prompt_combination_uses_the_prompt_slice(tiny_llama):
    delta = build_delta(DeltaConfig("prompt+lora", 4, DIM, seed=3), tiny_llama)
    prompt = build_delta(DeltaConfig("prompt", 4, 6, seed=3), tiny_llama)
    z = torch.tensor(population(2, dim=DIM))
    torch.testing.assert_close(delta.prompts(z), prompt.prompts(z[:, :6]), rtol=0, atol=0)


# ---- UniPELT gates ------------------------------------------------------------------


def test_gates_multiply_each_layers_update(tiny_backbone):
    delta = build_delta(DeltaConfig("unipelt:lora+adapter+bias", 0, DIM), tiny_backbone)
    plain = build_delta(DeltaConfig("lora+adapter+bias", 0, DIM - delta.num_gates), tiny_backbone)
    layers = tiny_backbone.num_layers
    assert delta.num_gates == 3 * layers
    z = torch.tensor(population(4, dim=DIM, scale=2.0))
    gates = delta.gates(z)
    assert gates.shape == (4, 3 * layers)
    torch.testing.assert_close(delta.gates(torch.zeros(1, DIM)), torch.full((1, 3 * layers), 0.5))
    # Gated entries are the plain parameters times their layer's gate, per candidate.
    gated, ungated = delta.parameters(z), plain.parameters(z[:, :DIM - delta.num_gates])
    bias_part = delta.parts[2]
    first = delta.widths[0] + delta.widths[1]
    for (name, _), segment in zip(bias_part.modules, bias_part.layout):
        layer = int(name.split("layer")[1].split(".")[1]) if ".layer" in "." + name else None
        g = gates[:, 2 * layers + layer][:, None] if layer is not None else 1.0
        cols = slice(first + segment.start, first + segment.stop)
        torch.testing.assert_close(gated[:, cols], ungated[:, cols] * g)


@pytest.mark.parametrize("kind", ["unipelt:lora+adapter+bias", "unipelt:prompt+lora"])
def test_gates_change_the_logits(tiny_backbone, kind):
    engine = Engine(tiny_backbone)
    session = make_session(engine, kind)
    z = np.repeat(population(1, dim=DIM, scale=2.0), 2, axis=0)
    z[1, -session.delta.num_gates:] += 3.0  # same parts' slices, other gates
    logits = engine.evaluate(session.id, "train", z).logits
    assert np.abs(logits[0] - logits[1]).max() > 1e-4


# ---- AdaMix -------------------------------------------------------------------------


def adamix_session(engine, kind="adamix:lora", seed=3):
    splits = {"train": EXAMPLES, "dev": EXAMPLES}
    return make_session(engine, kind, seed=seed, splits=splits)


def test_adamix_merge_of_identical_copies_is_one_copy(tiny_backbone):
    engine = Engine(tiny_backbone)
    session = adamix_session(engine, "adamix:adapter")
    delta = session.delta
    delta.copies = [delta.copies[0]] * delta.num_copies  # M copies of the same projection
    one = engine.create_session({"train": EXAMPLES}, template_for(tiny_backbone), VERBALIZER,
                                DeltaConfig("adapter", 0, DIM, seed=3))
    z = population(3, dim=DIM, scale=2.0)
    expected = engine.evaluate(one.id, "train", z).logits
    np.testing.assert_allclose(engine.evaluate(session.id, "dev", z).logits, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(engine.evaluate(session.id, "train", z).logits, expected, rtol=0, atol=1e-5)


def test_adamix_routed_and_merged_differ_and_routing_is_deterministic(tiny_backbone):
    engine = Engine(tiny_backbone)
    session = adamix_session(engine)
    z = population(3, dim=DIM, scale=3.0)
    routed = engine.evaluate(session.id, "train", z).logits
    merged = engine.evaluate(session.id, "dev", z).logits  # the same examples, merged copies
    assert np.abs(routed - merged).max() > 1e-4
    np.testing.assert_array_equal(engine.evaluate(session.id, "train", z).logits, routed)
    # The same seed gives the same routes in another session; the routes use several copies.
    other = adamix_session(Engine(tiny_backbone))
    indices = range(len(EXAMPLES))
    assert other.delta.route(indices) == session.delta.route(indices)
    assert len(set(session.delta.route(range(64)))) > 1
    # A row routed to copy j gets exactly copy j's parameters.
    delta = session.delta
    params = delta.parameters(torch.tensor(z))
    calls = []
    original = delta.copies[0].patched
    delta.copies[0].patched = lambda rows, slots=None: calls.append(rows) or original(rows, slots)
    with delta.patched(params, None, Routing("train", (0, 1, 2))):
        pass
    route = delta.route([0, 1, 2])
    copies = params.view(3, delta.num_copies, -1)
    torch.testing.assert_close(calls[0], copies[:, route].reshape(9, -1))


def test_adamix_routes_every_split_named_routed(tiny_backbone):
    engine = Engine(tiny_backbone)
    session = make_session(engine, "adamix:lora", seed=3,
                           splits={"train": EXAMPLES, "test": EXAMPLES, "test-routed": EXAMPLES})
    z = population(2, dim=DIM, scale=3.0)
    train = engine.evaluate(session.id, "train", z).logits
    np.testing.assert_array_equal(engine.evaluate(session.id, "test-routed", z).logits, train)
    assert np.abs(engine.evaluate(session.id, "test", z).logits - train).max() > 1e-4


def test_adamix_routed_subrange_matches_the_full_split(tiny_llama):
    engine = Engine(tiny_llama)
    session = adamix_session(engine)
    z = population(2, dim=DIM, scale=3.0)
    full = engine.evaluate(session.id, "train", z).logits
    part = engine.evaluate(session.id, "train", z, start=2, count=3).logits
    np.testing.assert_allclose(part, full[:, 2:5], rtol=0, atol=1e-5)


# ---- gradients and refusals ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["unipelt:lora+adapter+bias", "adamix:lora"])
def test_gradient_matches_finite_differences(tiny_llama, kind):
    engine = Engine(tiny_llama, allow_gradients=True)
    session = make_session(engine, kind)
    assert_gradients_match_finite_differences(engine, session, dim=DIM)


@pytest.mark.parametrize("kind, extra, message", [
    ("prompt+nope", {}, "unknown delta kind 'nope'.*parts can be"),
    ("lora+lora", {}, "repeats a part"),
    ("prompt+deep-prompt", {"prompt_length": 4}, "at most one prompt-like part"),
    ("lora+adapter", {"targets": ("q_proj",)}, "targets are ambiguous"),
    ("lora+adapter", {"prompt_length": 4}, "has no prompt"),
    ("mystery:lora+bias", {}, "unknown mix"),
    ("adamix:prompt", {"prompt_length": 4}, "adamix takes one weight kind"),
    ("adamix:lora+bias", {}, "adamix takes one weight kind"),
    ("adamix0:lora", {}, "copies"),
    ("unipelt:prompt", {"prompt_length": 4}, "unipelt gates act on"),
    ("unipelt:lora+adapter+bias", {"intrinsic_dim": 7}, "too small"),
    ("prompt+lora", {"prompt_length": 4, "part_dims": (4, 4)}, r"part_dims \[4, 4\] must .* summing to intrinsic_dim"),
    ("prompt+lora", {"prompt_length": 4, "part_dims": (12,)}, "each of the 2 parts"),
    ("unipelt:prompt+lora", {"prompt_length": 4, "intrinsic_dim": 10, "part_dims": (5, 5)}, "minus its 2 gate"),
    ("lora", {"part_dims": (12,)}, "has one part"),
    ("prompt+lora", {"prompt_length": 4, "part_dims": (0, 12)}, ">= 1 each"),
])
def test_bad_kinds_are_refused(tiny_llama, kind, extra, message):
    config = {"prompt_length": 0, "intrinsic_dim": DIM, **extra}
    with pytest.raises(InvalidArgument, match=message):
        build_delta(DeltaConfig(kind, **config), tiny_llama)


def test_declared_part_dims_split_z(tiny_llama):
    delta = build_delta(DeltaConfig("unipelt:prompt+lora", 4, 12, part_dims=(7, 3)), tiny_llama)
    gates = tiny_llama.num_layers
    assert delta.z_blocks == [("prompt", 7), ("lora", 3), ("gates", gates)] and delta.z_dim == 12
    assert [part.config.intrinsic_dim for part in delta.parts] == [7, 3]
    # The prompt part reads exactly its 7 coordinates.
    z = torch.zeros(1, 12)
    z[0, 7:] = 1.0
    prompt = build_delta(DeltaConfig("prompt", 4, 7), tiny_llama)  # part 0 keeps the session seed
    torch.testing.assert_close(delta.prompts(z), prompt.prompts(torch.zeros(1, 7)), rtol=0, atol=0)


def test_targets_go_to_the_single_weight_part(tiny_llama):
    delta = build_delta(DeltaConfig("prompt+lora", 4, DIM, rank=2, targets=("q_proj",)), tiny_llama)
    assert len(delta.parts[1].modules) == tiny_llama.num_layers and delta.parts[1].rank == 2
