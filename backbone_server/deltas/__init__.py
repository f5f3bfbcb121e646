"""Delta kinds: each turns a population of intrinsic vectors z into model changes.

A kind registers itself by name; `build_delta` looks it up. Importing this package
imports every kind so that the registry is complete.
"""

from backbone_server.deltas.base import DELTA_KINDS, Delta, build_delta, register_delta
from backbone_server.deltas import soft_prompt  # noqa: F401  (registers "prompt")
from backbone_server.deltas import lora  # noqa: F401  (registers "lora")
from backbone_server.deltas import bias  # noqa: F401  (registers "bias")
from backbone_server.deltas import adapter  # noqa: F401  (registers "adapter")
from backbone_server.deltas import deep_prompt  # noqa: F401  (registers "deep-prompt")

__all__ = ["DELTA_KINDS", "Delta", "build_delta", "register_delta"]
