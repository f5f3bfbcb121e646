"""z reparametrised on top of a delta: SAID's per-layer scales (identity at start, one
scale per layer) and learned subspaces (the file's round trip and size bound, the delta
they generate, what a server refuses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbone_server.deltas import DeltaConfig, build_delta
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument
from backbone_server.subspace import Subspace, load_subspace, parse_hosted, save_subspace
from tests.server.test_engine import EXAMPLES, VERBALIZER, template_for

KINDS = [("prompt", 2), ("prefix", 2), ("deep-prompt", 2), ("lora", 0), ("prompt+lora", 2)]


def config(kind, prompt_length, dim=4, **extra):
    return DeltaConfig(kind, prompt_length=prompt_length, intrinsic_dim=dim, seed=5, **extra)


def outputs(delta, z):
    params = delta.parameters(z)
    return delta.prompts(z), params


@pytest.mark.parametrize("kind, n", KINDS)
def test_said_scales_are_the_identity_at_start(tiny_llama, kind, n):
    """With the scales' coordinates at 0 the SAID delta is the plain subspace's, for every z."""
    plain, said = build_delta(config(kind, n), tiny_llama), build_delta(config(kind, n, said=True), tiny_llama)
    assert said.z_blocks[:-1] == plain.z_blocks and said.z_blocks[-1][0] == "said_scales"
    z = torch.randn(3, plain.z_dim, generator=torch.Generator().manual_seed(0))
    with_scales = torch.cat([z, torch.zeros(3, said.z_dim - plain.z_dim)], dim=1)
    for ours, theirs in zip(outputs(said, with_scales), outputs(plain, z)):
        if theirs is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_said_has_one_scale_per_layer_and_scales_that_layer_alone(tiny_llama):
    plain, said = build_delta(config("lora", 0), tiny_llama), build_delta(config("lora", 0, said=True), tiny_llama)
    assert said.group_names == [f"layer{l}" for l in range(tiny_llama.num_layers)]
    z = torch.randn(1, plain.z_dim, generator=torch.Generator().manual_seed(1))
    scales = torch.zeros(1, tiny_llama.num_layers)
    scales[0, 1] = 1.0  # layer 1's offset doubled, layer 0's kept
    start = plain.parameters(torch.zeros_like(z))
    offset = plain.parameters(z) - start
    got = said.parameters(torch.cat([z, scales], dim=1)) - start
    for segment in plain.layout:
        factor = 2.0 if segment.layer == 1 else 1.0
        torch.testing.assert_close(segment.of(got), factor * segment.of(offset), rtol=1e-5, atol=1e-6)


def basis(size, k, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, k)))
    return q.T.astype(np.float32)


def test_a_subspace_file_round_trips_and_is_refused_over_its_bound(tmp_path):
    subspace = Subspace(basis(40, 3), np.array([3.0, 2.0, 1.0], np.float32), {"kind": "prompt", "tasks": ["rte"]})
    path = save_subspace(subspace, tmp_path / "s.npz")
    again = load_subspace(path)
    np.testing.assert_array_equal(again.basis, subspace.basis)
    np.testing.assert_array_equal(again.scales, subspace.scales)
    assert again.meta == subspace.meta and again.dim == 3 and again.delta_size == 40
    with pytest.raises(InvalidArgument, match="over the bound"):
        load_subspace(path, max_bytes=path.stat().st_size - 1)
    (tmp_path / "bad.npz").write_bytes(b"not an archive")
    with pytest.raises(InvalidArgument, match="not a subspace file"):
        load_subspace(tmp_path / "bad.npz")
    with pytest.raises(InvalidArgument, match="NAME=FILE"):
        parse_hosted(["no-equals-sign"])
    assert set(parse_hosted([f"mine={path}"])) == {"mine"}


@pytest.mark.parametrize("kind, n", [("prompt", 2), ("prefix", 2), ("lora", 0)])
def test_a_learned_subspace_moves_the_start_along_its_scaled_directions(tiny_llama, kind, n):
    plain = build_delta(config(kind, n), tiny_llama)
    size = plain.num_parameters
    subspace = Subspace(basis(size, 3), np.array([0.5, 0.2, 0.1], np.float32))
    delta = build_delta(config(kind, n, dim=2, projection="subspace:s"), tiny_llama, {"s": subspace})
    assert delta.z_blocks == [("z", 2)] and delta.num_parameters == size
    z = torch.tensor([[1.0, -2.0]])
    prompts, params = outputs(delta, z)
    start_prompts, start_params = outputs(plain, torch.zeros(1, plain.z_dim))
    flat = [(prompts - start_prompts).reshape(-1)]
    if params is not None:
        flat.append((params - start_params).reshape(-1))
    expected = 1.0 * 0.5 * subspace.basis[0] - 2.0 * 0.2 * subspace.basis[1]
    np.testing.assert_allclose(torch.cat(flat).numpy(), expected, atol=1e-5)


def test_a_server_refuses_a_subspace_it_does_not_host_or_that_does_not_fit(tiny_llama):
    engine = Engine(tiny_llama, subspaces={"s": Subspace(basis(10, 2), np.ones(2, np.float32), {"kind": "prompt"})})

    def session(projection, dim=2):
        return engine.create_session({"train": EXAMPLES}, template_for(tiny_llama, "after"), VERBALIZER,
                                     config("prompt", 2, dim=dim, projection=projection))

    with pytest.raises(InvalidArgument, match="hosts no subspace 'other'.*hosted: s"):
        session("subspace:other")
    with pytest.raises(InvalidArgument, match="D = 10.*D = 128"):
        session("subspace:s")
