"""Delta kinds: each turns a population of intrinsic vectors z into model changes.

A kind is one module here with one class registered by `@register_delta`, plus its
import line below (the registration line: importing this package makes the registry
complete). The order of the lines is the order kinds are listed in messages.
"""

from backbone_server.deltas import lora  # noqa: F401  (registers "lora")
from backbone_server.deltas import soft_prompt  # noqa: F401  (registers "prompt")
from backbone_server.deltas import bias  # noqa: F401  (registers "bias")
from backbone_server.deltas import adapter  # noqa: F401  (registers "adapter")
from backbone_server.deltas import deep_prompt  # noqa: F401  (registers "deep-prompt")
from backbone_server.deltas import prefix  # noqa: F401  (registers "prefix")
from backbone_server.deltas.base import DELTA_KINDS, Delta, DeltaConfig, Routing, register_delta
from backbone_server.deltas.build import build_delta, delta_forms, kind_infos

__all__ = ["DELTA_KINDS", "Delta", "DeltaConfig", "Routing", "build_delta", "delta_forms", "kind_infos",
           "register_delta"]
