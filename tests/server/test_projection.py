from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backbone_server.deltas.base import DeltaConfig
from backbone_server.deltas.soft_prompt import SoftPrompt
from backbone_server.errors import InvalidArgument
from backbone_server.projection import (
    PROJECTION_KINDS,
    DenseProjection,
    FastfoodProjection,
    SparseProjection,
    make_projection,
    walsh_hadamard,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_same_seed_same_matrix_other_seed_other_matrix(kind):
    a = DenseProjection(kind, 20, 300, seed=7, std=0.1, device=CPU)
    b = DenseProjection(kind, 20, 300, seed=7, std=0.1, device=CPU)
    c = DenseProjection(kind, 20, 300, seed=8, std=0.1, device=CPU)
    assert torch.equal(a.matrix_t, b.matrix_t)
    assert not torch.allclose(a.matrix_t, c.matrix_t)


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_projection_has_the_requested_spread(kind):
    projection = DenseProjection(kind, 100, 2000, seed=0, std=0.05, device=CPU)
    assert projection.matrix_t.std().item() == pytest.approx(0.05, rel=0.02)
    if kind == "uniform":
        assert projection.matrix_t.abs().max().item() <= math.sqrt(3) * 0.05


def test_soft_prompt_follows_bbt_scaling(tiny_llama):
    """A z drawn with sigma 1 moves the prompt by about the embeddings' own spread."""
    config = DeltaConfig("prompt", prompt_length=10, intrinsic_dim=400, seed=1)
    delta = SoftPrompt(config, tiny_llama)
    z = torch.randn(64, 400, generator=torch.Generator().manual_seed(0))
    offsets = delta.prompts(z) - delta.initial_prompt
    embedding_std = tiny_llama.embeddings.weight.std().item()
    assert offsets.std().item() == pytest.approx(embedding_std, rel=0.1)
    assert torch.equal(delta.prompts(torch.zeros(1, 400))[0], delta.initial_prompt)
    special = set(tiny_llama.tokenizer.all_special_ids)
    assert not special & set(delta.initial_token_ids)


# ---------------------------------------------------------------------------------------
# Every projection kind: the shared contract.

REPO = Path(__file__).resolve().parents[2]
STD = 0.05


def build(kind, d=100, D=3000, seed=7, std=STD, dtype=torch.float32, **kwargs):
    """d is not a power of two, so Fastfood pads; identity gets D = d."""
    if kind == "identity":
        D = d
    return make_projection(kind, d, D, seed=seed, std=std, device=CPU, dtype=dtype, **kwargs)


def normal_z(population, d, seed=0, dtype=torch.float32):
    return torch.randn(population, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def explicit_matrix(projection, dtype=torch.float32):
    """(d, D): the projection is linear, so p(z) = z @ M with M = p(I)."""
    return projection(torch.eye(projection.in_dim, dtype=dtype))


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_kinds_are_listed():
    assert PROJECTION_KINDS == ("normal", "uniform", "sparse", "fastfood", "identity")


@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_seeded_and_deterministic(kind):
    z = normal_z(5, 100)
    a, b, c = build(kind, seed=7), build(kind, seed=7), build(kind, seed=8)
    assert torch.equal(a(z), b(z))
    assert torch.equal(a(z), a(z))
    if kind == "identity":
        assert torch.equal(a(z), c(z))  # nothing random
    else:
        assert not torch.allclose(a(z), c(z))


def test_deterministic_across_processes(tmp_path):
    script = (
        "import sys, torch\n"
        "from backbone_server.projection import PROJECTION_KINDS, make_projection\n"
        "z = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))\n"
        "out = {k: make_projection(k, 100, 100 if k == 'identity' else 3000, 7, 0.05, 'cpu')(z)"
        " for k in PROJECTION_KINDS}\n"
        "torch.save(out, sys.argv[1])\n"
    )
    path = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, check=True)
    theirs = torch.load(path)
    z = normal_z(3, 100)
    for kind in PROJECTION_KINDS:
        assert torch.equal(build(kind)(z), theirs[kind]), kind


@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_shape_batching_zero_and_linearity(kind):
    projection = build(kind)
    D = projection.out_dim
    z = normal_z(6, 100)
    out = projection(z)
    assert out.shape == (6, D) and out.dtype == torch.float32 and out.device == CPU
    assert (projection.in_dim, projection.kind) == (100, kind)
    rows = torch.cat([projection(z[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(out, rows, rtol=1e-6, atol=1e-6)
    assert torch.equal(projection(torch.zeros(2, 100)), torch.zeros(2, D))
    z1, z2 = normal_z(4, 100, seed=1), normal_z(4, 100, seed=2)
    torch.testing.assert_close(projection(0.7 * z1 - 1.3 * z2), 0.7 * projection(z1) - 1.3 * projection(z2),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_a_candidate_projects_the_same_bits_in_any_population(kind):
    """Replicas score shares of a population, a client may score candidates one by one:
    each candidate's delta must not depend on who else is in its call."""
    projection = build(kind)
    z = normal_z(20, 100)
    whole = projection(z)
    for part in (z[:1], z[:3], z[3:10], z[10:]):
        first = next(i for i in range(len(z)) if torch.equal(z[i], part[0]))
        assert torch.equal(projection(part), whole[first:first + len(part)])


@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_spread_matches_the_dense_normal_projection(kind):
    """For z ~ N(0, I), each output has standard deviation about std * sqrt(d)."""
    d = 100 if kind != "identity" else 2000
    projection = build(kind, d=d, D=2000)
    out = projection(normal_z(400, d))
    assert out.std().item() == pytest.approx(STD * math.sqrt(d), rel=0.1)
    assert out.mean().item() == pytest.approx(0.0, abs=0.05 * STD * math.sqrt(d))


@pytest.mark.parametrize("kind", ["sparse", "fastfood"])
def test_row_norms_are_exact_where_the_normalisation_says_so(kind):
    """Sparse: every row of the matrix has norm std * sqrt(d). Fastfood: the same when d
    is a power of two (no padding); with padding, on average."""
    for d, exact in ((64, True), (100, kind == "sparse")):
        matrix = explicit_matrix(build(kind, d=d, D=1000, dtype=torch.float64), torch.float64)  # (d, D)
        norms = matrix.norm(dim=0)
        target = STD * math.sqrt(d)
        if exact:
            torch.testing.assert_close(norms, torch.full_like(norms, target), rtol=1e-9, atol=0)
        else:
            assert (norms ** 2).mean().item() == pytest.approx(target ** 2, rel=0.05)


@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_gradient_is_the_transpose_action(kind):
    projection = build(kind, d=20, D=20 if kind == "identity" else 300)
    matrix = explicit_matrix(projection)  # (d, D)
    z = normal_z(5, 20).requires_grad_()
    weights = normal_z(5, projection.out_dim, seed=3)
    (projection(z) * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights @ matrix.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_gradcheck_in_double(kind):
    projection = build(kind, d=6, D=6 if kind == "identity" else 40, dtype=torch.float64)
    z = normal_z(3, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(projection, (z,))
    assert torch.autograd.gradgradcheck(projection, (z,))


def test_walsh_hadamard_matches_the_sylvester_matrix():
    for n in (1, 2, 8, 64):
        x = normal_z(3, n, dtype=torch.float64)
        torch.testing.assert_close(walsh_hadamard(x), x @ sylvester(n))
        x = normal_z(2 * 3 * n, 1, dtype=torch.float64).view(2, 3, n)  # batched leading dims
        torch.testing.assert_close(walsh_hadamard(x), x @ sylvester(n))
    with pytest.raises(ValueError, match="power-of-two"):
        walsh_hadamard(torch.zeros(2, 6))


def test_fastfood_is_stacked_s_h_g_pi_h_b_blocks():
    projection = FastfoodProjection(5, 20, seed=3, std=0.1, device=CPU, dtype=torch.float64)
    n, blocks = projection.block, projection.blocks
    assert (n, blocks) == (8, 3)
    h = sylvester(n)
    rows = []
    for b in range(blocks):
        sign = torch.diag(projection.sign[b])
        perm = projection.permutation[b * n:(b + 1) * n] - b * n
        pi = torch.eye(n, dtype=torch.float64)[perm]        # (Pi x)_i = x_perm(i)
        gain = torch.diag(projection.gain[b])               # G and S folded
        rows.append(h @ gain @ pi @ h @ sign)
    stacked = torch.cat(rows)[:20, :5]                      # truncate D, pad d
    torch.testing.assert_close(explicit_matrix(projection, torch.float64), stacked.t())
    assert sorted(perm.tolist()) == list(range(n))


def test_fastfood_reaches_millions_in_linear_memory():
    d, D = 500, 2_000_000
    start = time.perf_counter()
    projection = make_projection("fastfood", d, D, seed=0, std=0.01, device=CPU)
    out = projection(normal_z(4, d))
    elapsed = time.perf_counter() - start
    assert out.shape == (4, D) and torch.isfinite(out).all()
    stored = sum(t.numel() for t in projection.tensors().values())
    assert stored <= 3 * (D + 512)                     # sign, permutation, gain: O(D), not O(D d)
    assert projection.nbytes <= 16 * (D + 512)
    assert out.std().item() == pytest.approx(0.01 * math.sqrt(d), rel=0.1)
    assert elapsed < 60, f"fastfood D={D} took {elapsed:.1f}s"


def test_sparse_rows_have_k_distinct_entries():
    projection = SparseProjection(400, 1000, seed=1, std=STD, device=CPU)
    assert projection.per_row == 20  # round(sqrt(400))
    matrix = explicit_matrix(projection).t()   # (D, d)
    nonzero = matrix != 0
    assert (nonzero.sum(1) == 20).all()
    magnitude = STD * math.sqrt(400 / 20)
    torch.testing.assert_close(matrix[nonzero].abs(), torch.full((20_000,), magnitude))
    assert 0.4 < (matrix[nonzero] > 0).float().mean().item() < 0.6
    assert make_projection("sparse", 100, 50, 0, STD, CPU, density=0.5).per_row == 50
    dense_enough = make_projection("sparse", 8, 50, 0, STD, CPU, density=1.0)
    assert (explicit_matrix(dense_enough) != 0).all()
    with pytest.raises(InvalidArgument, match="density"):
        make_projection("sparse", 100, 50, 0, STD, CPU, density=0.0)


def test_make_projection_normal_is_the_dense_projection():
    z = normal_z(3, 20)
    for kind in ("normal", "uniform"):
        dense = DenseProjection(kind, 20, 300, seed=7, std=0.1, device=CPU)
        torch.testing.assert_close(make_projection(kind, 20, 300, 7, 0.1, CPU)(z), dense(z), rtol=0, atol=0)


def test_identity_scales_and_refuses_other_sizes():
    projection = make_projection("identity", 16, 16, seed=0, std=0.25, device=CPU)
    z = normal_z(2, 16)
    torch.testing.assert_close(projection(z), z * 0.25 * 4.0)
    assert projection.nbytes == 0
    with pytest.raises(InvalidArgument, match="d = D = 32"):
        make_projection("identity", 16, 32, seed=0, std=0.25, device=CPU)


def test_bad_requests_are_refused():
    with pytest.raises(InvalidArgument, match="unknown projection 'fourier'"):
        make_projection("fourier", 4, 8, 0, 0.1, CPU)
    for d, D in ((0, 8), (4, 0), (-1, 8)):
        for kind in PROJECTION_KINDS:
            with pytest.raises(InvalidArgument, match="positive"):
                make_projection(kind, d, D, 0, 0.1, CPU)
    with pytest.raises(InvalidArgument, match="std"):
        make_projection("fastfood", 4, 8, 0, float("nan"), CPU)
    with pytest.raises(InvalidArgument, match=r"\(P, 4\)"):
        make_projection("fastfood", 4, 8, 0, 0.1, CPU)(torch.zeros(2, 5))


@pytest.mark.parametrize("kind", ["normal", "sparse", "fastfood", "identity"])
def test_soft_prompt_scaling_holds_for_every_kind(tiny_llama, kind):
    length = 10 if kind != "identity" else 2
    dim = 400 if kind != "identity" else length * tiny_llama.hidden_size
    config = DeltaConfig("prompt", prompt_length=length, intrinsic_dim=dim, seed=1, projection=kind)
    delta = SoftPrompt(config, tiny_llama)
    assert delta.projection.kind == kind
    offsets = delta.prompts(normal_z(64, dim)) - delta.initial_prompt
    assert offsets.std().item() == pytest.approx(tiny_llama.embeddings.weight.std().item(), rel=0.1)
    assert torch.equal(delta.prompts(torch.zeros(1, dim))[0], delta.initial_prompt)


def test_soft_prompt_identity_says_which_dimension_it_needs(tiny_llama):
    config = DeltaConfig("prompt", prompt_length=2, intrinsic_dim=10, projection="identity")
    with pytest.raises(InvalidArgument, match=f"d = D = {2 * tiny_llama.hidden_size}"):
        SoftPrompt(config, tiny_llama)


# ---------------------------------------------------------------------------------------
# p0 from words (init_text) instead of random word tokens.

@pytest.mark.parametrize("kind", ["prompt", "prefix", "deep-prompt", "prompt+lora"])
def test_init_text_is_the_prompts_start_repeated_to_its_length(tiny_llama, kind):
    from backbone_server.deltas.build import build_delta

    words = tiny_llama.tokenizer("great bad", add_special_tokens=False)["input_ids"]
    delta = build_delta(DeltaConfig(kind, prompt_length=5, intrinsic_dim=8, seed=1, init_text="great bad"), tiny_llama)
    assert delta.initial_token_ids == [words[i % len(words)] for i in range(5)]
    short = build_delta(DeltaConfig(kind, prompt_length=1, intrinsic_dim=8, seed=1, init_text="great bad"), tiny_llama)
    assert short.initial_token_ids == words[:1]
    random_words = build_delta(DeltaConfig(kind, prompt_length=5, intrinsic_dim=8, seed=1), tiny_llama)
    assert random_words.initial_token_ids != delta.initial_token_ids


@pytest.mark.parametrize("kind", ["bias", "lora+bias"])
def test_init_text_is_refused_without_a_prompt(tiny_llama, kind):
    from backbone_server.deltas.build import build_delta

    with pytest.raises(InvalidArgument, match="no prompt"):
        build_delta(DeltaConfig(kind, prompt_length=0, intrinsic_dim=8, init_text="great"), tiny_llama)


def test_init_text_has_a_size_limit():
    with pytest.raises(InvalidArgument, match="at most 2000"):
        DeltaConfig("prompt", prompt_length=5, intrinsic_dim=8, init_text="word " * 1000)
