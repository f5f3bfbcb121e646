"""What a client asks a server to generate from z, and what a server says it can build.

* `DeltaForm`: which kinds make up the delta and how they mix, as data. On the wire it
  travels as `DeltaSpec.kind`, a string: one kind ("lora"), parts joined by "+"
  ("prompt+lora"), UniPELT gates over the parts ("unipelt:lora+adapter") or AdaMix copies
  of one kind ("adamix:lora", "adamix4:lora"). `DeltaForm.parse` is the only reader of
  that string and `str(form)` the only writer; whether the kinds exist and may mix so is
  the server's to say.
* `DeltaSpec`: the proto's DeltaSpec field for field, declared once here; the message
  conversions read these fields.
* `KindInfo`: one delta kind a server offers and what it takes (GetInfo's `kinds`).

Errors here are `ValueError`s; each side turns them into its own.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from blackbox.v1 import backbone_pb2 as pb
from blackbox.v1.messages import message_fields, to_message

UNIPELT = "unipelt"
ADAMIX = "adamix"
MIXES = (UNIPELT, ADAMIX)
_ADAMIX_PREFIX = re.compile(rf"{ADAMIX}(\d*)")


@dataclass(frozen=True)
class DeltaForm:
    """The kinds of a delta (`parts`, in order: each drives its own slice of z) and their
    mix: "" (one kind, or a plain combination), "unipelt" (per-layer gates on every part)
    or "adamix" (`copies` copies of the one part; 0: the server's default)."""

    parts: tuple[str, ...]
    mix: str = ""
    copies: int = 0

    def __post_init__(self):
        object.__setattr__(self, "parts", tuple(self.parts))
        if not self.parts or any(not part or re.search(r"[+:\s]", part) for part in self.parts):
            raise ValueError(f"a delta needs kind names without '+', ':' or spaces, got {list(self.parts)}")
        if self.mix not in ("",) + MIXES:
            raise ValueError(f"unknown mix {self.mix!r}; known: {', '.join(MIXES)}")
        if self.copies and self.mix != ADAMIX:
            raise ValueError("copies are for the adamix mix alone")

    @classmethod
    def parse(cls, kind: str) -> DeltaForm:
        """The form of a wire kind string ("lora", "prompt+lora", "unipelt:lora+adapter",
        "adamix4:lora")."""
        mix, copies = "", 0
        if ":" in kind:
            prefix, kind = kind.split(":", 1)
            adamix = _ADAMIX_PREFIX.fullmatch(prefix)
            if adamix is not None:
                mix, copies = ADAMIX, int(adamix.group(1) or 0)
                if adamix.group(1) and copies == 0:
                    raise ValueError("adamix needs at least 1 of its copies, got 0")
            elif prefix == UNIPELT:
                mix = UNIPELT
            else:
                raise ValueError(f"unknown mix {prefix!r} in delta kind {prefix + ':' + kind!r}; "
                                 "known: unipelt:KIND+KIND, adamix:KIND, adamixM:KIND")
        return cls(tuple(kind.split("+")), mix, copies)

    def __str__(self) -> str:
        prefix = f"{ADAMIX}{self.copies or ''}:" if self.mix == ADAMIX else f"{self.mix}:" if self.mix else ""
        return prefix + "+".join(self.parts)

    @property
    def single(self) -> str | None:
        """The kind, when the delta is one kind with no mix; else None."""
        return self.parts[0] if len(self.parts) == 1 and not self.mix else None


@dataclass(frozen=True)
class DeltaSpec:
    """What z generates. `kind` is a `DeltaForm`'s wire string (`form` reads it)."""

    kind: str = "prompt"
    prompt_length: int = 50
    intrinsic_dim: int = 500
    projection: str = "normal"
    seed: int = 0
    projection_scale: float = 1.0
    rank: int = 0  # kinds with a rank (lora) or a bottleneck size (adapter); 0: the kind's default
    targets: tuple[str, ...] = ()  # module-name suffixes a weight kind changes; (): the kind's default
    per_layer_z: bool = False  # every layer its own block of intrinsic_dim coordinates (BBTv2's layout)
    part_dims: tuple[int, ...] = ()  # combinations: each part's share of z, in kind order; (): equal shares
    init_text: str = ""  # kinds with a prompt: p0 from this text's tokens; "": random word tokens
    said: bool = False  # one more coordinate of z per layer scaling that layer's offset (SAID)

    @functools.cached_property
    def form(self) -> DeltaForm:
        return DeltaForm.parse(self.kind)

    def to_message(self) -> pb.DeltaSpec:
        return to_message(self, pb.DeltaSpec)

    @classmethod
    def from_message(cls, message: pb.DeltaSpec):
        """The spec a message carries, with the proto's defaults for unset fields (kind
        "prompt", projection "normal", projection_scale 1)."""
        fields = message_fields(message, cls)
        return cls(**{**fields, "kind": fields["kind"] or "prompt", "projection": fields["projection"] or "normal",
                      "projection_scale": fields["projection_scale"] or 1.0})


@dataclass(frozen=True)
class KindInfo:
    """A delta kind a server can build, and what it takes (the proto's DeltaKind)."""

    name: str
    summary: str = ""
    takes_prompt: bool = False  # puts prompt_length >= 1 vectors at {prompt}; else prompt_length is 0
    rank_name: str = ""  # what DeltaSpec.rank means for it ("rank", "bottleneck size"); "": it takes none
    default_rank: int = 0
    takes_targets: bool = False  # DeltaSpec.targets choose the modules it changes
    gated_roles: tuple[str, ...] = ()  # the parts of its delta a UniPELT gate scales, per layer
    peft_type: str = ""  # PEFT's type of its export where PEFT has the kind; "": blackbox's own format
    per_layer_z: bool = False  # can give every layer its own block of z
    mixable: bool = False  # AdaMix can hold copies of it
    reuses_prefix: bool = False  # leaves the tokens ahead of the prompt alone (causal prefix reuse)
    kv_prompt: bool = False  # its prompt is keys and values at every layer, attended to, never run
    note: str = ""  # what it costs on this server's model in particular, in words

    def to_message(self) -> pb.DeltaKind:
        return to_message(self, pb.DeltaKind)

    @classmethod
    def from_message(cls, message: pb.DeltaKind) -> KindInfo:
        return cls(**message_fields(message, cls))
