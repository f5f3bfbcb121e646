"""The contract every delta kind fulfils, the capabilities it declares, and the registry.

A kind is one class, registered with `@register_delta`: its capabilities are class
attributes (what GetInfo reports, what combinations, gates and export read), a built
delta holds its `layout` (the named segments of its parameters) and turns a population
of z into model changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, ContextManager

import torch

from backbone_server.deltas.budget import (
    FLOAT_BYTES,
    MAX_INTRINSIC_DIM,
    MAX_NAME_CHARS,
    MAX_PARTS,
    MAX_TARGETS,
    SEED_MODULUS,
    current_budget,
    delta_bytes_estimate,
    reserved_projection,
)
from backbone_server.deltas.exported import Exported, ExportRequest
from backbone_server.deltas.layout import Layout
from backbone_server.deltas.modules import ModulePlaces
from backbone_server.errors import InvalidArgument, shown
from backbone_server.projection import seeded_generator
from blackbox.v1.delta_spec import DeltaSpec, KindInfo

# A prompt's initial words: a sentence or two, never a document.
MAX_INIT_TEXT_CHARS = 2000
# The integer fields and their bounds: (lowest, highest or None) and what to do. The
# highest rank and prompt_length depend on the model; the kinds and build_delta check them.
_INTEGERS = {
    "intrinsic_dim": (1, MAX_INTRINSIC_DIM),
    "prompt_length": (0, None),
    "rank": (0, None),
    "seed": (0, SEED_MODULUS - 1),
}
_RANGES = {"seed": "0 .. 2**64 - 1 (the wire's uint64)",
           "intrinsic_dim": f"1 .. {MAX_INTRINSIC_DIM:,} (2**24)"}


def _integer(name: str, value) -> int:
    """`value` as an int within the bounds of the field `name`, or InvalidArgument."""
    low, high = _INTEGERS[name]
    if not _is_whole(value):
        raise InvalidArgument(f"{name} must be an integer, got {str(value)[:60]!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = _RANGES.get(name, f">= {low}")
        raise InvalidArgument(f"{name} must be {bound}, got {str(value)[:60]}")
    return value


@dataclass(frozen=True)
class DeltaConfig(DeltaSpec):
    """What a client asks for (the protocol's DeltaSpec), validated; `form` (the kinds
    and their mix) is parsed here, once. Every size is bounded here or, where the bound
    is the model's, by the kind and `build_delta`, before anything is allocated; no
    message shows more than ~60 characters of a client's text or list."""

    def __post_init__(self):
        for name in _INTEGERS:
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
        for name in ("kind", "projection"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidArgument(f"{name} must be a string, got {type(value).__name__}")
            if len(value) > MAX_NAME_CHARS:
                raise InvalidArgument(f"{name} {shown(value)} is longer than {MAX_NAME_CHARS} characters; name a "
                                      f"{'delta' if name == 'kind' else 'projection'} kind GetInfo lists")
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise InvalidArgument(f"targets must be a list of module names, got {shown(str(self.targets))}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if len(self.targets) > MAX_TARGETS:
            raise InvalidArgument(f"targets name {len(self.targets):,} modules; at most {MAX_TARGETS}: name "
                                  "module-name suffixes (\"q_proj\" matches the q_proj of every layer)")
        if any(len(t) > MAX_NAME_CHARS for t in self.targets):
            raise InvalidArgument(f"targets {shown(self.targets)}: a module name has at most {MAX_NAME_CHARS} "
                                  "characters")
        if len(self.init_text) > MAX_INIT_TEXT_CHARS:
            raise InvalidArgument(f"init_text has {len(self.init_text)} characters; at most {MAX_INIT_TEXT_CHARS}")
        if not (self.projection_scale > 0 and math.isfinite(self.projection_scale)):
            raise InvalidArgument(f"projection_scale must be finite and > 0, got {self.projection_scale}")
        if any(not t.strip(".") or t != t.strip() for t in self.targets):
            raise InvalidArgument(f"targets must be non-empty module names, got {shown(self.targets)}")
        if len(set(self.targets)) != len(self.targets):
            raise InvalidArgument(f"targets repeat a name: {shown(self.targets)}")
        if len(self.part_dims) > MAX_PARTS:
            raise InvalidArgument(f"part_dims has {len(self.part_dims):,} entries; a combination has at most "
                                  f"{MAX_PARTS} parts: give one size per part of the kind, in kind order")
        if not all(_is_whole(d) for d in self.part_dims):
            raise InvalidArgument(f"part_dims must be integers, got {shown([str(d) for d in self.part_dims])}")
        object.__setattr__(self, "part_dims", tuple(int(d) for d in self.part_dims))
        if any(not 1 <= d <= MAX_INTRINSIC_DIM for d in self.part_dims):
            raise InvalidArgument(f"part_dims must be >= 1 each and at most {MAX_INTRINSIC_DIM:,} (they sum to "
                                  f"intrinsic_dim), got {shown(self.part_dims)}")
        try:
            self.form
        except ValueError as error:
            message = str(error)
            if len(message) > 200:  # it quotes the kind
                message = (f"delta kind {shown(self.kind)} does not parse; write KIND, KIND+KIND[+KIND...], "
                           "unipelt:KIND+KIND or adamix[M]:KIND with the kinds GetInfo lists")
            raise InvalidArgument(message) from None


def _is_whole(value) -> bool:
    try:
        return not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        return False


@dataclass(frozen=True)
class Routing:
    """Which examples a chunk's rows hold: the split's name and each row's example index
    within that split (B,). AdaMix routes the examples of the search split to copies."""

    split: str
    indices: tuple[int, ...]


class Delta:
    """A built delta for one session.

    Input side: `prompt_length` input vectors are spliced in where the template says
    {prompt}; `prompts(z)` returns them for a whole population at once.

    Weight side: `parameters(z)` maps the whole population to its per-candidate
    parameters (P, D) in one computation (None: the kind changes no module), laid out as
    `layout` says, and `patched(params, slots, routing)` is a context manager that, while
    entered, makes the model's modules apply the candidates of `params` (p, D) to a
    forward whose rows are laid out candidate-major (p * B rows). `slots` (B, L) long
    gives, for each position of the chunk's B rows (shared by every candidate), the
    prompt slot it holds (0 .. n - 1) or -1 (kinds acting at the prompt positions inside
    the model use it; None outside the engine); `routing` (a Routing, or None) says which
    examples the rows hold. It must restore the modules exactly on exit, also on an
    exception. The engine computes `parameters` once per call and enters `patched`
    around each chunk's forward with that chunk's rows of it.

    `changes_prefix`: the candidate changes what the model computes for tokens ahead of
    the prompt, so their keys and values cannot be shared between candidates (no prefix
    reuse).
    """

    # ---- capabilities: what the kind is and takes (GetInfo's `kinds`) ------------------
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    takes_prompt: ClassVar[bool] = False  # vectors at {prompt}: prompt_length >= 1, else 0
    kv_prompt: ClassVar[bool] = False  # its prompt is keys and values at every layer (`key_values`), not inputs
    rank_name: ClassVar[str] = ""  # what DeltaConfig.rank means for it; "": no rank
    default_rank: ClassVar[int] = 0
    takes_targets: ClassVar[bool] = False  # DeltaConfig.targets choose its modules
    gated_roles: ClassVar[tuple[str, ...]] = ()  # the segments a UniPELT gate of their layer scales
    peft_type: ClassVar[str] = ""  # the peft_type its export writes ("LORA", "BLACKBOX_BIAS"); "": none
    per_layer_z: ClassVar[bool] = False  # can give every layer its own block of z
    mixable: ClassVar[bool] = False  # AdaMix can hold copies of it
    changes_prefix: bool = False  # a combination's is its parts'

    # ---- a built delta --------------------------------------------------------------------
    config: DeltaConfig
    prompt_length: int = 0
    hidden_size: int = 0
    dtype: torch.dtype = torch.float32
    layout: Layout = Layout()
    description: str = ""

    def __init__(self, config: DeltaConfig, backbone):
        self.check_config(config)
        self._bind(config, backbone)

    def _bind(self, config: DeltaConfig, backbone) -> None:
        self.config = config
        self.prompt_length = config.prompt_length
        self.hidden_size = backbone.hidden_size
        self.dtype = backbone.dtype

    @classmethod
    def check_config(cls, config: DeltaConfig) -> None:
        """Refuses what the kind does not take."""
        if cls.takes_prompt and config.prompt_length < 1:
            raise InvalidArgument(f"delta kind {config.kind!r} puts vectors at {{prompt}}: it needs "
                                  f"prompt_length >= 1, got {config.prompt_length}")
        if not cls.takes_prompt and config.init_text:
            raise InvalidArgument(f"delta kind {config.kind!r} has no prompt to initialise from init_text")
        if not cls.takes_prompt and config.prompt_length:
            raise InvalidArgument(f"delta kind {config.kind!r} has no prompt; prompt_length must be 0, "
                                  f"got {config.prompt_length}")
        if not cls.rank_name and not cls.takes_targets and (config.rank or config.targets):
            raise InvalidArgument(f"delta kind {config.kind!r} takes no rank or targets (those are for weight kinds)")
        if not cls.rank_name and config.rank:
            raise InvalidArgument(f"delta kind {config.kind!r} takes no rank")
        if not cls.takes_targets and config.targets:
            raise InvalidArgument(f"delta kind {config.kind!r} takes no targets")
        if config.per_layer_z and not cls.per_layer_z:
            raise InvalidArgument(f"per_layer_z (one z block per layer) is for {', '.join(per_layer_kinds())} "
                                  f"alone, not {config.kind!r}")

    @classmethod
    def gate_layers(cls, num_layers: int) -> range:
        """The layers a UniPELT gate of this kind scales, one gate each."""
        return range(num_layers) if cls.gated_roles else range(0)

    @classmethod
    def note(cls, backbone) -> str:
        """What the kind costs on `backbone` in particular, in words ("": nothing to say)."""
        return ""

    @classmethod
    def info(cls, backbone=None) -> KindInfo:
        return KindInfo(name=cls.name, summary=cls.summary, takes_prompt=cls.takes_prompt, rank_name=cls.rank_name,
                        default_rank=cls.default_rank, takes_targets=cls.takes_targets,
                        gated_roles=cls.gated_roles, peft_type=cls.peft_type, per_layer_z=cls.per_layer_z,
                        mixable=cls.mixable, reuses_prefix=not cls.changes_prefix, kv_prompt=cls.kv_prompt,
                        note=cls.note(backbone) if backbone is not None else "")

    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        """(P, d) -> (P, prompt_length, hidden) input embeddings (none by default)."""
        return torch.zeros(z.shape[0], 0, self.hidden_size, device=z.device, dtype=self.dtype)

    def parameters(self, z: torch.Tensor) -> torch.Tensor | None:
        """(P, d) -> (P, D) per-candidate parameters for `patched`, or None."""
        return None

    def key_values(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(p, D) parameters -> per layer, the candidates' (p, kv_heads, prompt_length,
        head_dim) keys and values at the prompt positions (kinds with `kv_prompt` only)."""
        raise NotImplementedError(f"delta kind {self.name!r} puts no keys and values at {{prompt}}")

    def patched(self, params: torch.Tensor | None, slots: torch.Tensor | None = None,
                routing: Routing | None = None) -> ContextManager:
        """The modules changed for the candidates of `params` (p, D) while entered."""
        return contextlib.nullcontext()

    def export(self, z: torch.Tensor, request: ExportRequest) -> Exported:
        """The delta of one z ((1, d), on the backbone's device) as stored tensors."""
        raise InvalidArgument(f"delta kind {self.config.kind!r} cannot be exported; exportable kinds: "
                              f"{', '.join(exportable_kinds())}")

    # Its hooks (`row_hooks`, what `patched` installs) act on each row alone: a module's
    # output for a row depends on that row's input and its candidate's parameters only, so
    # its rows can share a forward with other deltas' rows, each hooked by its own delta.
    # `row_hooks_pre`: they are forward pre-hooks (with keyword arguments), not forward hooks.
    row_local = False
    row_hooks_pre = False

    @property
    def changes_modules(self) -> bool:
        """Whether the kind installs hooks (`patched`)."""
        return type(self).patched is not Delta.patched

    def row_hooks(self, params: torch.Tensor, slots: torch.Tensor | None = None
                  ) -> list[tuple[torch.nn.Module, Callable]]:
        """(module, hook) pairs for the candidates of `params` (p, D), whose rows are
        candidate-major, with `slots` (B, L) the prompt slot of each position or -1 (kinds
        with `row_local` only)."""
        raise NotImplementedError(f"delta kind {self.name!r} has no row-local hooks")

    def row_hook_sets(self, params: torch.Tensor, slots: torch.Tensor | None = None,
                      routing: Routing | None = None) -> list[tuple[bool, list[tuple[torch.nn.Module, Callable]]]]:
        """Its row-local hooks as (pre, hooks) sets, what `patched` installs for these rows:
        `row_hooks` in one set of its form by default; a combination gives one set per
        part, so its parts' forms may differ; AdaMix its copies' hooks as `routing` says."""
        return [(self.row_hooks_pre, self.row_hooks(params, slots))]

    @property
    def num_parameters(self) -> int:
        """D: the size of the delta generated from z (prompt vectors or module parameters)."""
        return self.prompt_length * self.hidden_size + self.layout.size

    @property
    def z_blocks(self) -> list[tuple[str, int]]:
        """z's layout: consecutive (name, size) blocks that drive separate parts of the
        delta (a combination's parts, a per-layer deep prompt's layers), which a client
        may optimise in turns. One block, the whole z, by default."""
        return [("z", self.config.intrinsic_dim)]

    @property
    def z_dim(self) -> int:
        """The length of each candidate's z."""
        return sum(size for _, size in self.z_blocks)


class LayerBlocks:
    """For kinds with `per_layer_z`: z is one block of intrinsic_dim coordinates per layer
    ("layer0", "layer1", ...: BBTv2's layout for divide and conquer), or, without it, one z
    that drives every layer. A kind sets `z_layers` to its number of layers."""

    config: DeltaConfig
    z_layers: int

    @property
    def z_blocks(self) -> list[tuple[str, int]]:
        d = self.config.intrinsic_dim
        if not self.config.per_layer_z:
            return [("z", d)]
        return [(f"layer{l}", d) for l in range(self.z_layers)]

    def whole_identity(self, config: DeltaConfig, width: int) -> DeltaConfig:
        """The config the kind builds with: the identity projection with intrinsic_dim =
        z_layers x `width` (each layer's share of the delta) makes z the whole delta, one
        block of `width` per layer: the white-box "no projection" reference that an
        intrinsic-dimension study compares d with. Any other config is kept as it is."""
        whole = self.z_layers * width
        if config.projection != "identity" or config.per_layer_z or config.intrinsic_dim == width:
            return config  # d = width: one identity z shared by every layer
        if config.intrinsic_dim != whole:
            raise InvalidArgument(f"the identity projection on {config.kind!r} needs intrinsic_dim d = D = {whole} "
                                  f"(the whole delta: {self.z_layers} layers x {width}), or {width} for one z "
                                  f"shared by every layer; got d = {config.intrinsic_dim}")
        return dataclasses.replace(config, intrinsic_dim=width, per_layer_z=True)

    def layer_z(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """The coordinates of z that drive `layer`."""
        if not self.config.per_layer_z:
            return z
        d = self.config.intrinsic_dim
        return z[:, layer * d:(layer + 1) * d]


class ProjectedWeights(Delta):
    """A kind whose per-candidate module parameters are `start + scales * P z`: P one
    seeded projection of unit spread (each output coordinate ~ N(0, 1) for z ~ N(0, I)),
    `scales` the per-coordinate spread the kind wants and `start` its fixed starting
    values (None: zero). Such kinds change the modules every token goes through. A
    subclass builds its `layout` and exports one vector of parameters
    (`export_parameters`)."""

    changes_prefix = True
    takes_targets = True
    mixable = True
    start: torch.Tensor | None = None
    # Multiplies every scale of the kind: set so that at projection_scale 1 a random
    # z ~ N(0, I) moves the model about as much as BBT's scaling moves a soft prompt
    # (measured with scripts/probe_scale.py; the weights' own statistics alone overshoot).
    base_scale: float = 1.0

    def _check_size(self, config: DeltaConfig, size: int, vectors: int) -> None:
        """Refuses, before anything of it is allocated, a delta of `size` parameters whose
        projection and `vectors` float32 vectors of `size` (scales, a start) exceed what
        is left of the memory budget."""
        current_budget().check(
            delta_bytes_estimate(config.projection, config.intrinsic_dim, size, vectors=vectors),
            f"delta kind {shown(config.kind)} (D = {size:,} parameters through a {shown(config.projection)} "
            f"projection from d = {config.intrinsic_dim:,})")

    def _build_projection(self, config: DeltaConfig, device: torch.device, scales: list[torch.Tensor],
                          starts: list[torch.Tensor] | None = None) -> None:
        size = self.layout.size
        vectors = 1 if starts is None else 2
        self._check_size(config, size, vectors)
        current_budget().reserve(vectors * size * FLOAT_BYTES, f"the scales and start of {size:,} parameters")
        self.scales = torch.cat(scales).to(device) * self.base_scale
        self.start = None if starts is None else torch.cat(starts).to(device)
        assert len(self.scales) == size, "one scale per parameter of the layout"
        self.projection = reserved_projection(config.projection, config.intrinsic_dim, size, seed=config.seed,
                                              std=1.0 / config.intrinsic_dim ** 0.5, device=device)

    @classmethod
    def _check_rank(cls, rank: int, limits: list[tuple[int, str]]) -> None:
        """Refuses a rank (the adapter's bottleneck size) above what one of the modules
        takes, before anything is allocated: `limits`, per module, the most it takes and
        in words why ("min(in, out) of ... (64 -> 32)")."""
        most, why = min(limits, key=lambda limit: limit[0])
        if rank > most:
            raise InvalidArgument(
                f"{cls.rank_name} {rank} is more than {most}, {why}: choose {cls.rank_name} 1 .. {most} "
                f"(0: the default, {cls.default_rank}) or targets without that module")

    def _build_factors(self, config: DeltaConfig, backbone, factors: list[tuple]) -> list[tuple]:
        """Layout and projection of a kind whose update of each module is a product of two
        factors (LoRA's B A, the adapter's W_up and W_down). `factors`: per module, (module,
        (role, shape, scale) of the first factor, (role, shape, scale) of the second). The
        first starts at a fixed random matrix drawn from the session's seed, of entries of
        standard deviation 1 / sqrt(its last dimension); the second at zero, so that z = 0
        is the base model. Returns (module, first segment, second segment) per module.
        The memory it all takes is checked before any of it is allocated."""
        size = sum(math.prod(first[1]) + math.prod(second[1]) for _, first, second in factors)
        self._check_size(config, size, vectors=2)
        places = ModulePlaces(backbone)
        pieces, scales, starts = [], [], []
        generator = seeded_generator(config.seed)
        for module, (first_role, first_shape, first_scale), (second_role, second_shape, second_scale) in factors:
            path, layer = places.path(module), places.layer(module)
            pieces += [(first_role, path, first_shape, layer), (second_role, path, second_shape, layer)]
            first, second = math.prod(first_shape), math.prod(second_shape)
            scales += [torch.full((first,), first_scale), torch.full((second,), second_scale)]
            starts += [torch.randn(first, generator=generator) / first_shape[-1] ** 0.5, torch.zeros(second)]
        self.layout = Layout.tiled(pieces)
        self._build_projection(config, backbone.device, scales, starts)
        return [(module, self.layout[2 * i], self.layout[2 * i + 1]) for i, (module, *_) in enumerate(factors)]

    def parameters(self, z: torch.Tensor) -> torch.Tensor:
        params = self.projection(z) * self.scales
        return params if self.start is None else params + self.start

    def export(self, z: torch.Tensor, request: ExportRequest) -> Exported:
        if request.fold_prefix:
            raise InvalidArgument("only a soft or deep prompt can fold the tokens ahead of it")
        return self.export_parameters(self.parameters(z)[0], request)

    def export_parameters(self, params: torch.Tensor, request: ExportRequest) -> Exported:
        """The delta of one vector of parameters (D,) as stored tensors."""
        raise InvalidArgument(f"delta kind {self.name!r} cannot be exported; exportable kinds: "
                              f"{', '.join(exportable_kinds())}")


DELTA_KINDS: dict[str, type[Delta]] = {}


def register_delta(cls: type[Delta]) -> type[Delta]:
    """Class decorator: makes the kind available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in DELTA_KINDS:
        raise ValueError(f"delta kind {cls.name!r} is already registered")
    DELTA_KINDS[cls.name] = cls
    return cls


def kind_class(kind: str, whole: str | None = None) -> type[Delta]:
    """The registered class of `kind` (a part of the delta kind `whole`, if given)."""
    cls = DELTA_KINDS.get(kind)
    if cls is None:
        where = f" in {shown(whole)}; parts can be" if whole and whole != kind else "; this server supports"
        raise InvalidArgument(f"unknown delta kind {shown(kind)}{where} {', '.join(sorted(DELTA_KINDS))}")
    return cls


def exportable_kinds() -> list[str]:
    return [name for name, cls in DELTA_KINDS.items() if cls.peft_type]


def per_layer_kinds() -> list[str]:
    return [name for name, cls in DELTA_KINDS.items() if cls.per_layer_z]
