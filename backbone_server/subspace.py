"""Learned task subspaces (Qin et al. 2021): a projection found from other runs' tuned
deltas instead of drawn at random, saved as one file a server operator hosts by name.

A subspace file is a NumPy .npz archive:
- `basis` (k, D) float32: orthonormal directions of the full delta space (the prompt
  vectors, flattened, then the module parameters, as the delta lays them out), best first;
- `scales` (k,) float32: each direction's spread over the runs it was fitted on (the
  RMS of their coordinates along it), so that z ~ N(0, I) moves as far as they moved;
- `meta`: a JSON string: the delta `kind`, `prompt_length`, `model`, `delta_size` (D),
  the runs and tasks it came from, and the share of their squared norm each direction
  explains.

A session selects a hosted one with the projection "subspace:NAME" and intrinsic_dim
d <= k: delta = start + sum_i z_i scales_i basis_i over the first d directions, where
start is the session's own z = 0 (its p0, its model's weights).
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backbone_server.errors import InvalidArgument, ResourceExhausted

SUBSPACE_PREFIX = "subspace:"
# A file above this is refused unless the operator raises the bound (--max-subspace-mb):
# 64 MiB holds 16 directions of a 1M-parameter delta.
DEFAULT_MAX_BYTES = 64 * 2 ** 20
# Uploads a server holds at most, so that clients cannot fill its memory one bound at a time.
MAX_UPLOADED = 16
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Subspace:
    basis: np.ndarray  # (k, D)
    scales: np.ndarray  # (k,)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.basis.ndim != 2 or self.scales.shape != (self.basis.shape[0],) or self.basis.shape[0] < 1:
            raise ValueError(f"a subspace needs basis (k, D) and scales (k,), got {self.basis.shape} and "
                             f"{self.scales.shape}")
        if not (np.isfinite(self.basis).all() and np.isfinite(self.scales).all()):
            raise ValueError("a subspace's basis and scales must be finite")

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def delta_size(self) -> int:
        return self.basis.shape[1]

    def describe(self) -> str:
        meta = self.meta
        return (f"{self.dim} directions of a {meta.get('kind', '?')} delta (D = {self.delta_size}, prompt length "
                f"{meta.get('prompt_length', '?')}) on {meta.get('model', '?')}, fitted on "
                f"{len(meta.get('runs', []))} runs of {', '.join(meta.get('tasks', [])) or '?'}")


def save_subspace(subspace: Subspace, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, basis=subspace.basis.astype(np.float32), scales=subspace.scales.astype(np.float32),
                 meta=np.array(json.dumps(subspace.meta)))
    return path


def load_subspace(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Subspace:
    """Reads a subspace file, refusing one over `max_bytes` before reading its arrays."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise InvalidArgument(f"cannot read the subspace file {path}: {error.strerror}") from None
    if size > max_bytes:
        raise InvalidArgument(f"the subspace file {path} has {size / 2 ** 20:.1f} MiB, over the bound of "
                              f"{max_bytes / 2 ** 20:.1f} MiB (raise it with --max-subspace-mb)")
    return read_subspace(path, str(path), max_bytes)


MEMBERS = ("basis.npy", "scales.npy", "meta.npy")


def read_subspace(source, what: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Subspace:
    """A subspace from a path or a file object (`what` names it in errors).

    What the archive unpacks to is bounded before anything is unpacked (a small
    compressed upload must not become a large array), and each array's header is checked
    against its member's size before numpy allocates what the header claims."""
    try:
        with zipfile.ZipFile(source) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if sorted(members) != sorted(MEMBERS):
                raise ValueError(f"it must hold exactly {', '.join(MEMBERS)}")
            unpacked = sum(info.file_size for info in members.values())
            if unpacked > max_bytes:
                raise ResourceExhausted(f"{what} unpacks to {unpacked / 2 ** 20:.1f} MiB, over the bound of "
                                        f"{max_bytes / 2 ** 20:.1f} MiB")
            arrays = {name.removesuffix(".npy"): _read_member(archive, members[name]) for name in MEMBERS}
        meta = json.loads(str(arrays["meta"]))
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
        return Subspace(np.asarray(arrays["basis"], np.float32), np.asarray(arrays["scales"], np.float32), meta)
    except ResourceExhausted:
        raise
    except Exception as error:  # a hostile archive fails in many ways (zlib, zipfile, the npy header)
        raise InvalidArgument(f"{what} is not a subspace file (basis, scales, meta): "
                              f"{type(error).__name__}: {str(error)[:200]}") from None


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
        if dtype.hasobject:
            raise ValueError(f"{info.filename} holds Python objects")
        if math.prod(shape) * dtype.itemsize > info.file_size:
            raise ValueError(f"{info.filename}'s header claims shape {shape[:4]}, more than its data holds")
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def subspace_from_bytes(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Subspace:
    """An uploaded subspace, refused over `max_bytes` before it is parsed."""
    if len(data) > max_bytes:
        raise ResourceExhausted(f"the subspace has {len(data) / 2 ** 20:.1f} MiB, over this server's bound of "
                                f"{max_bytes / 2 ** 20:.1f} MiB")
    return read_subspace(io.BytesIO(data), "the uploaded data", max_bytes)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise InvalidArgument(f"a subspace name is 1-64 letters, digits, '_', '-' or '.', got {name!r}")
    return name


def parse_hosted(items: list[str], max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Subspace]:
    """`--subspace NAME=FILE` entries as {NAME: Subspace}."""
    hosted: dict[str, Subspace] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise InvalidArgument(f"--subspace takes NAME=FILE, got {item!r}")
        check_name(name)
        if name in hosted:
            raise InvalidArgument(f"--subspace {name!r} is given twice")
        hosted[name] = load_subspace(path, max_bytes)
    return hosted
