"""What a delta's parameters are: named segments of the vector `Delta.parameters(z)` gives
each candidate.

A kind builds its `Layout` once, when the delta is built; its hooks read their blocks of
the parameters through it, combinations shift and gate it, and export names the tensors
after it. A segment says which module it changes (its path in `backbone.model`), its role
there ("lora_A", "lora_B", "adapter_down", "adapter_up", "bias_shift", "prompt_offset"),
its shape, the transformer layer it sits in, and its slice of the vector. The segments
of a layout tile the vector: each starts where the one before it stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import torch


@dataclass(frozen=True)
class Segment:
    role: str
    module: str  # the module's path in backbone.model
    shape: tuple[int, ...]
    start: int  # first column of the segment in the parameter vector
    layer: int | None = None  # the transformer layer holding the module, if any

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        return self.start + self.size

    def of(self, params: torch.Tensor) -> torch.Tensor:
        """(..., D) parameters -> (..., *shape): this segment's block, per candidate."""
        return params[..., self.start:self.stop].reshape(*params.shape[:-1], *self.shape)


class Layout:
    """The segments of a parameter vector, in order (empty: the kind changes no module)."""

    def __init__(self, segments: Iterable[Segment] = ()):
        self.segments = tuple(segments)
        end = 0
        for segment in self.segments:
            if segment.start != end:
                raise ValueError(f"segment {segment.role} of {segment.module} starts at {segment.start}, not {end}")
            end = segment.stop
        self.size = end

    @classmethod
    def tiled(cls, pieces: Iterable[tuple[str, str, tuple[int, ...], int | None]]) -> Layout:
        """A layout of (role, module, shape, layer) pieces, each right after the last."""
        segments, start = [], 0
        for role, module, shape, layer in pieces:
            segments.append(Segment(role, module, tuple(shape), start, layer))
            start = segments[-1].stop
        return cls(segments)

    @classmethod
    def concat(cls, layouts: Iterable[Layout]) -> Layout:
        """The layouts one after another, each shifted past the ones before it."""
        segments, start = [], 0
        for layout in layouts:
            segments += [replace(segment, start=segment.start + start) for segment in layout]
            start += layout.size
        return cls(segments)

    def by_module(self) -> dict[str, dict[str, Segment]]:
        """{module path: {role: segment}}, modules in layout order."""
        grouped: dict[str, dict[str, Segment]] = {}
        for segment in self.segments:
            grouped.setdefault(segment.module, {})[segment.role] = segment
        return grouped

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, index: int) -> Segment:
        return self.segments[index]

    def __repr__(self) -> str:
        return f"Layout({len(self.segments)} segments, size {self.size})"
