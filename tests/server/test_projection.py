from __future__ import annotations

import math

import pytest
import torch

from backbone_server.deltas.base import DeltaConfig
from backbone_server.deltas.soft_prompt import SoftPrompt
from backbone_server.projection import DenseProjection

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
