"""The delta registry and the contract every delta kind fulfils."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from backbone_server.errors import InvalidArgument


@dataclass(frozen=True)
class DeltaConfig:
    """What a client asks for (the proto's DeltaSpec, validated)."""

    kind: str
    prompt_length: int
    intrinsic_dim: int
    projection: str = "normal"
    seed: int = 0
    projection_scale: float = 1.0

    def __post_init__(self):
        if self.intrinsic_dim < 1:
            raise InvalidArgument(f"intrinsic_dim must be >= 1, got {self.intrinsic_dim}")
        if self.prompt_length < 0:
            raise InvalidArgument(f"prompt_length must be >= 0, got {self.prompt_length}")
        if not self.projection_scale > 0:
            raise InvalidArgument(f"projection_scale must be > 0, got {self.projection_scale}")


class Delta:
    """A built delta for one session.

    `prompt_length` input vectors are spliced in where the template says {prompt};
    `prompts(z)` returns them for a whole population at once.
    """

    config: DeltaConfig
    prompt_length: int = 0

    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        """(P, d) -> (P, prompt_length, hidden) input embeddings."""
        raise NotImplementedError


DeltaFactory = Callable[[DeltaConfig, "object"], Delta]
DELTA_KINDS: dict[str, DeltaFactory] = {}


def register_delta(name: str) -> Callable[[DeltaFactory], DeltaFactory]:
    def decorator(factory: DeltaFactory) -> DeltaFactory:
        if name in DELTA_KINDS:
            raise ValueError(f"delta kind {name!r} is already registered")
        DELTA_KINDS[name] = factory
        return factory

    return decorator


def build_delta(config: DeltaConfig, backbone) -> Delta:
    factory = DELTA_KINDS.get(config.kind)
    if factory is None:
        raise InvalidArgument(
            f"unknown delta kind {config.kind!r}; this server supports {', '.join(sorted(DELTA_KINDS))}"
        )
    return factory(config, backbone)
