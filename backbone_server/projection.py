"""Seeded random projections from the intrinsic space (d) to a delta's space (D).

A projection is rebuilt from (kind, seed, shapes, std) wherever it is needed, so it
never crosses the wire. Every random draw comes from torch's CPU generator and the
result is then moved to the device: the same seed gives the same projection on every
machine.

Every kind keeps one contract, so that kinds can be swapped under the same search:

* `projection(z)` maps a population (P, d) to (P, D) in one batched computation;
* it is linear in z and differentiable with respect to z (autograd);
* it is deterministic from (kind, seed, d, D, std);
* for z ~ N(0, I_d) every output coordinate has a standard deviation of about
  std * sqrt(d), the spread of the dense normal projection with the same `std`
  (BBT's scaling: the caller passes std = alpha * std(embeddings) / (sqrt(d) * sigma0)).

Kinds:

* "normal", "uniform": a dense (D, d) matrix (`DenseProjection`); O(D d) memory.
* "sparse": a (D, d) matrix with k = round(density * d) non-zeros per row (`SparseProjection`);
  O(D k) memory.
* "fastfood": stacked Hadamard blocks (`FastfoodProjection`); O(D) memory, O(D log d) time,
  so that D can reach millions.
* "identity": delta = c z with d == D (`IdentityProjection`); the "full delta, no
  projection" mode. A kind with one projection per layer (prefix, deep prompt) takes
  d = D as one block of z per layer (`LayerBlocks.whole_identity`).

`projection_bytes(kind, d, D)` is what a projection will keep, known from the sizes
before anything is drawn: the deltas check it against their memory budget
(`backbone_server.deltas.budget`).

The kinds share this one module (under 500 lines) on purpose: each is a few
dozen lines around the contract above, which the tests check for every kind alike, and
the sparse and Fastfood kinds' autograd functions sit next to the kind that needs them.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from backbone_server.errors import InvalidArgument

PROJECTION_KINDS = ("normal", "uniform", "sparse", "fastfood", "identity")
CANDIDATE_BLOCK = 8  # rows of every matmul of a dense projection
DENSE_KINDS = ("normal", "uniform")


def _unknown_kind(kind) -> InvalidArgument:
    text = repr(kind) if len(str(kind)) <= 60 else f"{str(kind)[:60]!r}... ({len(str(kind)):,} characters)"
    return InvalidArgument(f"unknown projection {text}; choose from {', '.join(PROJECTION_KINDS)}")


def _is_int(value) -> bool:
    try:
        return not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        return False


def _check_dims(in_dim: int, out_dim: int) -> None:
    if not (_is_int(in_dim) and _is_int(out_dim)):
        raise InvalidArgument(f"projection dimensions must be integers, got d={in_dim!r}, D={out_dim!r}")
    if in_dim < 1 or out_dim < 1:
        raise InvalidArgument(f"projection dimensions must be positive, got d={in_dim}, D={out_dim}")


def _check_std(std: float) -> None:
    if not (math.isfinite(std) and std > 0):
        raise InvalidArgument(f"projection std must be finite and > 0, got {std}")


SEED_MODULUS = 2**64  # torch seeds its generators modulo 2**64 (-1 and 2**64 - 1 draw alike)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`, any integer: taken modulo 2**64 as torch itself
    takes negative seeds, so that derived seeds (seed + l * stride) near the top of the
    wire's uint64 draw instead of overflowing (every seed torch accepted draws as before)."""
    if not _is_int(seed):
        raise InvalidArgument(f"a seed must be an integer, got {str(seed)[:60]!r}")
    return torch.Generator(device="cpu").manual_seed(int(seed) % SEED_MODULUS)



class Projection:
    """What every projection offers: `kind`, `in_dim` (d), `out_dim` (D) and a call
    (P, d) -> (P, D). `tensors()` names what it stores (for memory accounting)."""

    kind: str
    in_dim: int
    out_dim: int

    def __call__(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def _check_input(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.in_dim:
            raise InvalidArgument(
                f"{self.kind} projection expects z of shape (P, {self.in_dim}), got {tuple(z.shape)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, d={self.in_dim}, D={self.out_dim})"


class DenseProjection(Projection):
    """delta = A z with A of shape (D, d), entries of standard deviation `std`.

    BBT draws A from N(0, std^2) with std = alpha * std(embeddings) / (sqrt(d) * sigma0),
    so that at the start of the search A z has the spread of real token embeddings; the
    caller passes that std. "uniform" draws from U(-sqrt(3) std, sqrt(3) std), the same
    spread with bounded entries.
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, seed: int, std: float,
                 device: torch.device, dtype: torch.dtype = torch.float32):
        if kind not in DENSE_KINDS:
            raise _unknown_kind(kind) if kind not in PROJECTION_KINDS else InvalidArgument(
                f"{kind!r} is not a dense projection; use make_projection")
        _check_dims(in_dim, out_dim)
        generator = seeded_generator(seed)
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
        """(P, d) -> (P, D), in matmuls of exactly CANDIDATE_BLOCK rows (the last one
        zero-padded). A matmul picks its kernel by its number of rows, and the results
        of another kernel differ in the last bit: over the whole population, a candidate
        would score differently alone, or in a replica's share, than in the population.
        Fixed blocks keep one kernel for every call, and each block reads the matrix once
        (a matrix-vector product per candidate would read it P times)."""
        self._check_input(z)
        z = z.to(device=self.matrix_t.device, dtype=self.matrix_t.dtype)
        population = z.shape[0]
        padded = F.pad(z, (0, 0, 0, -population % CANDIDATE_BLOCK))
        return torch.cat([block @ self.matrix_t for block in padded.split(CANDIDATE_BLOCK)])[:population]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"matrix_t": self.matrix_t}


def _csr(crow: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, size: tuple[int, int],
         device: torch.device) -> torch.Tensor:
    """A CSR tensor from arrays built valid by construction (sorted, in range), so
    without torch's invariant checks and its "beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow, columns, values, size=size, device=device,
                                       check_invariants=False)


class _SparseMatmul(torch.autograd.Function):
    """(P, d) -> (P, D) through a CSR matrix A (D, d); the backward multiplies by A^T,
    a CSR matrix (d, D) built on first use (torch's own backward through a CSR product
    transposes A on every call, ~10x slower)."""

    @staticmethod
    def forward(ctx, z, projection):
        ctx.projection = projection
        return torch.sparse.mm(projection.matrix, z.t()).t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _SparseMatmulTransposed.apply(grad, ctx.projection), None


class _SparseMatmulTransposed(torch.autograd.Function):
    """(P, D) -> (P, d) through A^T: the adjoint of `_SparseMatmul`, itself differentiable
    (its backward is `_SparseMatmul`), so double backward works too."""

    @staticmethod
    def forward(ctx, grad, projection):
        ctx.projection = projection
        return torch.sparse.mm(projection.transposed(), grad.t()).t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _SparseMatmul.apply(grad, ctx.projection), None


class SparseProjection(Projection):
    """delta = A z with A a sparse (D, d) matrix: every row has exactly
    k = clamp(round(density * d), 1, d) non-zeros, in distinct columns drawn uniformly,
    each +-std * sqrt(d / k) with a random sign (Achlioptas / Li et al.'s "very sparse"
    projections, with a fixed count per row instead of independent Bernoulli entries).

    Spread: an output coordinate is a sum of k terms +-std sqrt(d/k) z_j, so for
    z ~ N(0, I_d) its variance is exactly k * std^2 * d / k = std^2 * d, the dense normal
    projection's. The default density 1/sqrt(d) gives k ~ sqrt(d) (22 for d = 500), so
    memory is O(D sqrt(d)) instead of O(D d). Stored as a CSR tensor (int32 indices where
    they fit); A^T, for gradients, is built on the first backward and kept.
    """

    kind = "sparse"

    def __init__(self, in_dim: int, out_dim: int, seed: int, std: float, device: torch.device,
                 dtype: torch.dtype = torch.float32, density: float | None = None):
        _check_dims(in_dim, out_dim)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.per_row = k = _sparse_per_row(in_dim, density)
        self.density = k / in_dim
        generator = seeded_generator(seed)
        columns = self._distinct_columns(out_dim, in_dim, k, generator)
        signs = torch.randint(0, 2, (out_dim, k), generator=generator, dtype=torch.int8)
        magnitude = std * math.sqrt(in_dim / k)
        values = signs.to(dtype) * (2 * magnitude) - magnitude
        index_dtype = torch.int32 if out_dim * k < 2**31 - 1 else torch.int64
        crow = torch.arange(0, out_dim * k + 1, k, dtype=index_dtype)
        self.matrix = _csr(crow, columns.reshape(-1).to(index_dtype), values.reshape(-1),
                           (out_dim, in_dim), device)
        self._matrix_t: torch.Tensor | None = None

    @staticmethod
    def _distinct_columns(rows: int, d: int, k: int, generator: torch.Generator) -> torch.Tensor:
        """(rows, k) sorted int32 column indices, distinct within each row, uniform over k-subsets:
        draw with replacement, then redraw the duplicates until none is left."""
        if k == d:
            return torch.arange(d, dtype=torch.int32).expand(rows, d).contiguous()
        columns = torch.randint(d, (rows, k), generator=generator, dtype=torch.int32).sort(dim=1).values
        active = torch.arange(rows)  # rows that may still hold a duplicate
        while True:
            sub = columns[active]
            duplicate = torch.zeros_like(sub, dtype=torch.bool)
            duplicate[:, 1:] = sub[:, 1:] == sub[:, :-1]
            touched = duplicate.any(dim=1)
            if not bool(touched.any()):
                return columns
            active, sub, duplicate = active[touched], sub[touched], duplicate[touched]
            sub[duplicate] = torch.randint(d, (int(duplicate.sum()),), generator=generator, dtype=torch.int32)
            columns[active] = sub.sort(dim=1).values

    def transposed(self) -> torch.Tensor:
        """A^T as a CSR (d, D) matrix, built from A's arrays on first use."""
        if self._matrix_t is None:
            matrix = self.matrix
            columns = matrix.col_indices()
            order = torch.argsort(columns, stable=True)  # grouped by column, rows ascending
            rows = torch.div(order, self.per_row, rounding_mode="floor")
            counts = torch.bincount(columns, minlength=self.in_dim)
            crow = torch.zeros(self.in_dim + 1, dtype=torch.long, device=columns.device)
            crow[1:] = counts.cumsum(0)
            index_dtype = matrix.col_indices().dtype
            self._matrix_t = _csr(crow.to(index_dtype), rows.to(index_dtype), matrix.values()[order],
                                  (self.in_dim, self.out_dim), columns.device)
        return self._matrix_t

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(P, d) -> (P, D)."""
        self._check_input(z)
        z = z.to(device=self.matrix.device, dtype=self.matrix.dtype)
        return _SparseMatmul.apply(z, self)

    def tensors(self) -> dict[str, torch.Tensor]:
        found = {
            "crow_indices": self.matrix.crow_indices(),
            "col_indices": self.matrix.col_indices(),
            "values": self.matrix.values(),
        }
        if self._matrix_t is not None:
            found.update({
                "t_crow_indices": self._matrix_t.crow_indices(),
                "t_col_indices": self._matrix_t.col_indices(),
                "t_values": self._matrix_t.values(),
            })
        return found


def _fwht_(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of the last dimension (a power of two), in
    place: log2(n) butterfly stages, each viewing x as (rows, n / 2h, 2, h) and replacing
    the pair (a, b) by (a + b, a - b). Batched over all leading dimensions."""
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    h = 1
    while h < n:
        pairs = x.view(rows, n // (2 * h), 2, h)
        a = pairs[:, :, 0, :]
        b = pairs[:, :, 1, :]
        a.add_(b)                          # a <- a + b
        torch.sub(a, b, alpha=2, out=b)    # b <- (a + b) - 2b = a - b
        h *= 2
    return x


class _HadamardInPlace(torch.autograd.Function):
    """H x in place on a temporary (H unnormalised, symmetric: its adjoint is itself)."""

    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        return _fwht_(x)

    @staticmethod
    def backward(ctx, grad):
        return walsh_hadamard(grad)


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of the last dimension (length a power of two),
    out of place, differentiable: x @ H with H[i, j] = (-1)^popcount(i & j)."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {n}")
    return _HadamardInPlace.apply(x.clone(memory_format=torch.contiguous_format))


class FastfoodProjection(Projection):
    """delta = V z with V (D, d) never stored: V stacks ceil(D / n) independent n x n
    Fastfood blocks S H G Pi H B (Le et al. 2013; as used for intrinsic dimension by
    Li et al. 2018 and Aghajanyan et al. 2021), z zero-padded from d to n = 2^ceil(log2 d),
    the output truncated to D. Per block: B a random +-1 diagonal, H the (unnormalised,
    entries +-1) Walsh-Hadamard matrix, Pi a random permutation, G a Gaussian diagonal,
    S a scaling. Stored: B, Pi, and G with S folded in, O(D) numbers in all; a call costs
    O(P D log n).

    Normalisation (so the spread matches the dense normal projection): take
    S = std / ||g|| per block, with g the block's Gaussian diagonal. For z ~ N(0, I_d),
    u = H B z has Var(u_m) = d (d terms +-z_j). An output coordinate is
    y_k = S sum_i H_ki g_i u_Pi(i); its variance over z is
    S^2 (sum_i g_i^2 Var(u_Pi(i)) + cross terms) = S^2 ||g||^2 d + cross terms
    = std^2 d + cross terms. The cross terms g_i g_i' H_ki H_ki' Cov(u_Pi(i), u_Pi(i'))
    have zero mean over g, and vanish when d is a power of two (then H B z has
    covariance n I exactly, so every coordinate has variance exactly std^2 d); with
    padding they make single coordinates scatter around std^2 d, the pooled spread
    staying std * sqrt(d). (Dividing by ||g|| is the usual Fastfood normalisation in
    intrinsic-dimension code; the factor std sets the dense projection's spread.) S is
    a scalar per block, so S H G = H (S G): it is stored folded into G as `gain`.
    Pi acts as (Pi x)_i = x_perm(i).
    """

    kind = "fastfood"

    def __init__(self, in_dim: int, out_dim: int, seed: int, std: float, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        _check_dims(in_dim, out_dim)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.block = n = 1 << (in_dim - 1).bit_length()
        self.blocks = blocks = -(-out_dim // n)
        generator = seeded_generator(seed)
        sign = torch.randint(0, 2, (blocks, n), generator=generator, dtype=torch.int8) * 2 - 1
        keys = torch.rand(blocks, n, generator=generator, dtype=torch.float64)
        permutation = torch.argsort(keys, dim=1, stable=True)
        del keys
        gauss = torch.randn(blocks, n, generator=generator, dtype=torch.float64)
        gain = gauss * (std / gauss.norm(dim=1, keepdim=True))   # G with S folded in
        permutation += torch.arange(blocks).unsqueeze(1) * n      # flat index into (blocks * n)
        self.sign = sign.to(device=device, dtype=dtype)
        self.permutation = permutation.reshape(-1).to(device=device)
        self.gain = gain.to(device=device, dtype=dtype)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(P, d) -> (P, D)."""
        self._check_input(z)
        population = z.shape[0]
        n, blocks = self.block, self.blocks
        z = z.to(device=self.gain.device, dtype=self.gain.dtype)
        x = F.pad(z, (0, n - self.in_dim)).unsqueeze(1) * self.sign            # B z: (P, blocks, n)
        x = _HadamardInPlace.apply(x)                                          # H B z
        x = x.reshape(population, blocks * n).index_select(1, self.permutation)  # Pi
        x = _HadamardInPlace.apply(x.view(population, blocks, n) * self.gain)  # H G S
        x = x.view(population, blocks * n)
        if blocks * n != self.out_dim:
            x = x[:, : self.out_dim].contiguous()
        return x

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sign": self.sign, "permutation": self.permutation, "gain": self.gain}


class IdentityProjection(Projection):
    """delta = c z with c = std * sqrt(d), so that for z ~ N(0, I_d) each coordinate
    has the dense normal projection's spread std * sqrt(d). Needs d == D; no randomness
    (the seed is ignored). The white-box "full delta, no projection" mode."""

    kind = "identity"

    def __init__(self, in_dim: int, out_dim: int, seed: int, std: float, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        _check_dims(in_dim, out_dim)
        if in_dim != out_dim:
            raise InvalidArgument(
                f"the identity projection needs intrinsic_dim d = D = {out_dim} "
                f"(the delta's size), got d = {in_dim}"
            )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.scale = std * math.sqrt(in_dim)
        self.device = torch.device(device)
        self.dtype = dtype

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(P, d) -> (P, D)."""
        self._check_input(z)
        return z.to(device=self.device, dtype=self.dtype) * self.scale


def _sparse_per_row(in_dim: int, density: float | None) -> int:
    """k, the non-zeros per row of a sparse projection from d = in_dim."""
    if density is None:
        density = 1.0 / math.sqrt(in_dim)
    if not (math.isfinite(density) and 0 < density <= 1):
        raise InvalidArgument(f"sparse projection density must be in (0, 1], got {density}")
    return min(in_dim, max(1, round(density * in_dim)))


def projection_bytes(kind: str, in_dim: int, out_dim: int, dtype: torch.dtype = torch.float32, *,
                     density: float | None = None) -> int:
    """The bytes a projection of `kind` from d = in_dim to D = out_dim keeps, computed from
    the sizes alone, before anything is drawn (what `Projection.nbytes` reports once built,
    or more): dense d D values; sparse D k values and column indices plus the row offsets,
    twice (A^T, built on the first gradient, is kept too); Fastfood three vectors of
    ceil(D / n) n entries (n = d rounded up to a power of two: B, G and the int64 Pi);
    identity nothing. Bad kinds and dimensions are refused as `make_projection` refuses
    them."""
    if kind not in PROJECTION_KINDS:
        raise _unknown_kind(kind)
    _check_dims(in_dim, out_dim)
    d, D = int(in_dim), int(out_dim)
    item = torch.empty((), dtype=dtype).element_size()
    if kind in DENSE_KINDS:
        return d * D * item
    if kind == "sparse":
        k = _sparse_per_row(d, density)
        index = 4 if D * k < 2**31 - 1 else 8
        forward = D * k * (item + index) + (D + 1) * index
        transposed = D * k * (item + index) + (d + 1) * index
        return forward + transposed
    if kind == "fastfood":
        n = 1 << (d - 1).bit_length()
        return -(-D // n) * n * (2 * item + 8)
    return 0


def make_projection(kind: str, in_dim: int, out_dim: int, seed: int, std: float,
                    device: torch.device, dtype: torch.dtype = torch.float32, *,
                    density: float | None = None) -> Projection:
    """Build the projection `kind` from d = in_dim to D = out_dim, drawn from `seed`, with
    the dense normal projection's spread for entries of standard deviation `std`.
    `density` applies to "sparse" only (default 1 / sqrt(d))."""
    if kind not in PROJECTION_KINDS:
        raise _unknown_kind(kind)
    _check_dims(in_dim, out_dim)
    _check_std(std)
    in_dim, out_dim = int(in_dim), int(out_dim)
    device = torch.device(device)
    if kind in DENSE_KINDS:
        return DenseProjection(kind, in_dim, out_dim, seed, std, device, dtype)
    if kind == "sparse":
        return SparseProjection(in_dim, out_dim, seed, std, device, dtype, density=density)
    if kind == "fastfood":
        return FastfoodProjection(in_dim, out_dim, seed, std, device, dtype)
    return IdentityProjection(in_dim, out_dim, seed, std, device, dtype)
