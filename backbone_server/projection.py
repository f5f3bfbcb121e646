"""Seeded random projections from the intrinsic space (d) to a delta's space (D).

A projection is rebuilt from (kind, seed, shape, scale) wherever it is needed, so it
never crosses the wire. Matrices are drawn by torch's CPU generator and then moved to
the device: the same seed gives the same matrix on every machine.
"""

from __future__ import annotations

import math

import torch

from backbone_server.errors import InvalidArgument

PROJECTION_KINDS = ("normal", "uniform")


class DenseProjection:
    """delta = A z with A of shape (D, d), entries of standard deviation `std`.

    BBT draws A from N(0, std^2) with std = alpha * std(embeddings) / (sqrt(d) * sigma0),
    so that at the start of the search A z has the spread of real token embeddings; the
    caller passes that std. "uniform" draws from U(-sqrt(3) std, sqrt(3) std), the same
    spread with bounded entries.
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, seed: int, std: float,
                 device: torch.device, dtype: torch.dtype = torch.float32):
        if kind not in PROJECTION_KINDS:
            raise InvalidArgument(f"unknown projection {kind!r}; choose from {', '.join(PROJECTION_KINDS)}")
        if in_dim < 1 or out_dim < 1:
            raise InvalidArgument(f"projection dimensions must be positive, got d={in_dim}, D={out_dim}")
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        if kind == "normal":
            matrix = torch.randn(out_dim, in_dim, generator=generator) * std
        else:
            bound = math.sqrt(3.0) * std
            matrix = (torch.rand(out_dim, in_dim, generator=generator) * 2.0 - 1.0) * bound
        self.kind = kind
        self.in_dim = in_dim
        self.out_dim = out_dim
        # (d, D) so that a population (P, d) projects with one matmul.
        self.matrix_t = matrix.t().contiguous().to(device=device, dtype=dtype)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(P, d) -> (P, D)."""
        return z.to(self.matrix_t.dtype) @ self.matrix_t
