"""What one delta may cost: the ceilings on the sizes a client gives, and the memory a
built delta pins, counted before anything is allocated.

A DeltaSpec is a few hundred bytes; the delta built from it can pin gigabytes (a dense
d x D projection of a large d, LoRA of a rank as wide as the model). `build_delta` builds
inside `delta_budget(max_bytes)`, and every kind, before it allocates what it keeps (its
projections, as `projection_bytes` counts them per projection kind, and its float32
vectors of D entries: scales, a start, a prompt's p0), checks that against what is left
of the budget and reserves it: over the budget is RESOURCE_EXHAUSTED, said with the
bound and what to change. A combination's parts and AdaMix's copies draw on the one
budget of their delta. What a kind merely computes with at build time (a forward over
p0, the transient copy a dense matrix is transposed through) is not counted: it is gone
when the build returns.

Sizes that make no sense (a rank above a module's width, an intrinsic_dim above
MAX_INTRINSIC_DIM, a prompt longer than the model) are INVALID_ARGUMENT, refused by
DeltaConfig and the kinds; this module only says how much memory is too much.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch

from backbone_server.errors import ResourceExhausted, shown
from backbone_server.projection import make_projection, projection_bytes

# The memory one delta may pin, unless the engine (build_delta's max_bytes) says otherwise:
# a dense projection of d = 500 onto SmolLM2-135M's default LoRA (D = 230,400) pins 440 MiB.
MAX_DELTA_BYTES = 512 * 2**20
# intrinsic_dim's ceiling, whatever the memory: z of 2**24 float32 coordinates is 64 MiB a
# candidate on the wire. Identity references (d = D) of whole deltas fit: a SmolLM2 prefix
# of 10 tokens is d = 115,200, a LoRA of rank 4 on a 7B model's q and v about 4.2 million.
MAX_INTRINSIC_DIM = 2**24
SEED_MODULUS = 2**64  # seeds are the wire's uint64; derived seeds wrap around (torch's generators do too)
MAX_NAME_CHARS = 200  # a delta kind, a projection kind, one target's name
MAX_TARGETS = 1024  # module-name suffixes in `targets`
MAX_PARTS = 16  # entries of part_dims (a combination has one part per kind)
FLOAT_BYTES = 4  # the deltas keep their scales, starts and prompts in float32


def human_bytes(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes} bytes"


@dataclass
class DeltaBudget:
    """The bytes one delta may pin (`limit`) and those its built pieces pin (`used`)."""

    limit: int
    used: int = 0

    def check(self, nbytes: int, what: str) -> None:
        """Refuses `what`, about to pin `nbytes` more, if that exceeds the budget."""
        if self.used + nbytes > self.limit:
            held = f" on top of the {human_bytes(self.used)} the delta holds already" if self.used else ""
            limit = f"{self.limit:,} bytes" + (f" ({human_bytes(self.limit)})" if self.limit >= 2**10 else "")
            raise ResourceExhausted(
                f"{what} needs {human_bytes(nbytes)}{held}, more than the {limit} this server allows one delta; "
                "use a smaller intrinsic_dim, rank or prompt_length, or the 'fastfood' or 'sparse' projection "
                "(neither stores a d x D matrix)")

    def reserve(self, nbytes: int, what: str) -> None:
        self.check(nbytes, what)
        self.used += nbytes


_CURRENT: ContextVar[DeltaBudget | None] = ContextVar("delta_budget", default=None)


@contextlib.contextmanager
def delta_budget(max_bytes: int = MAX_DELTA_BYTES) -> Iterator[DeltaBudget]:
    """The budget the kinds built inside draw on (one per `build_delta`)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
    token = _CURRENT.set(DeltaBudget(max_bytes))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def current_budget() -> DeltaBudget:
    """The budget of the delta being built; a kind built outside `build_delta` gets a fresh
    one of MAX_DELTA_BYTES for each piece it checks."""
    return _CURRENT.get() or DeltaBudget(MAX_DELTA_BYTES)


def delta_bytes_estimate(projection: str, in_dim: int, out_dim: int, vectors: int = 0, projections: int = 1) -> int:
    """Bytes pinned by `projections` projections of kind `projection` from d = in_dim to
    D = out_dim each, plus `vectors` float32 vectors of D entries beside each (scales,
    a start)."""
    return projections * (projection_bytes(projection, in_dim, out_dim) + vectors * out_dim * FLOAT_BYTES)


def projection_what(kind: str, in_dim: int, out_dim: int, projections: int = 1) -> str:
    """`what` of a budget message for such projections."""
    count = f"{projections} " if projections > 1 else "a "
    plural = "s" if projections > 1 else ""
    return f"{count}{shown(kind)} projection{plural} from d = {in_dim:,} to D = {out_dim:,}"


def reserved_projection(kind: str, in_dim: int, out_dim: int, seed: int, std: float, device,
                        dtype: torch.dtype = torch.float32, what: str = ""):
    """`make_projection`, its memory reserved from the current budget before it is drawn."""
    current_budget().reserve(projection_bytes(kind, in_dim, out_dim, dtype),
                             what or projection_what(kind, in_dim, out_dim))
    return make_projection(kind, in_dim=in_dim, out_dim=out_dim, seed=seed, std=std, device=device, dtype=dtype)


def derived_seed(seed: int, offset: int) -> int:
    """seed + offset (a layer's, a part's, a copy's seed), wrapped into the wire's uint64."""
    return (int(seed) + offset) % SEED_MODULUS
