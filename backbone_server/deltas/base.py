"""The delta registry and the contract every delta kind fulfils."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

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
    rank: int = 0  # kinds with a rank (lora); 0: the kind's default
    targets: tuple[str, ...] = ()  # module-name suffixes for weight kinds; (): the kind's default
    # deep-prompt only: every layer gets its own intrinsic_dim coordinates of z (BBTv2's
    # layout, for optimising one layer at a time) instead of all layers sharing one z.
    per_layer_z: bool = False
    # Combinations only: the size of each part's slice of z, in kind order (the gates
    # come on top); (): equal shares.
    part_dims: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise InvalidArgument(f"targets must be a list of module names, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.intrinsic_dim < 1:
            raise InvalidArgument(f"intrinsic_dim must be >= 1, got {self.intrinsic_dim}")
        if self.prompt_length < 0:
            raise InvalidArgument(f"prompt_length must be >= 0, got {self.prompt_length}")
        if not self.projection_scale > 0:
            raise InvalidArgument(f"projection_scale must be > 0, got {self.projection_scale}")
        if self.rank < 0:
            raise InvalidArgument(f"rank must be >= 0, got {self.rank}")
        if any(not t.strip(".") or t != t.strip() for t in self.targets):
            raise InvalidArgument(f"targets must be non-empty module names, got {list(self.targets)}")
        if len(set(self.targets)) != len(self.targets):
            raise InvalidArgument(f"targets repeat a name: {list(self.targets)}")
        object.__setattr__(self, "part_dims", tuple(int(d) for d in self.part_dims))
        if any(d < 1 for d in self.part_dims):
            raise InvalidArgument(f"part_dims must be >= 1 each, got {list(self.part_dims)}")


@dataclass(frozen=True)
class Routing:
    """Which examples a chunk's rows hold: the split's name and each row's example index
    within that split (B,). The engine passes it to `patched` of deltas with
    `routed = True` only (AdaMix routes examples of the search split to copies)."""

    split: str
    indices: tuple[int, ...]


class Delta:
    """A built delta for one session.

    Input side: `prompt_length` input vectors are spliced in where the template says
    {prompt}; `prompts(z)` returns them for a whole population at once.

    Weight side: `parameters(z)` maps the whole population to its per-candidate
    parameters (P, D) in one computation (None: the kind changes no module), and
    `patched(params, slots)` is a context manager that, while entered, makes the model's
    modules apply the candidates of `params` (p, D) to a forward whose rows are laid
    out candidate-major (p * B rows). `slots` (B, L) long gives, for each position of the
    chunk's B rows (shared by every candidate), the prompt slot it holds (0 .. n - 1) or
    -1 (kinds acting at the prompt positions inside the model use it; others ignore it;
    None outside the engine). It must restore the modules exactly on exit, also on an
    exception. The engine computes `parameters` once per call and enters `patched`
    around each chunk's forward with that chunk's rows of it.

    `changes_prefix`: the candidate changes what the model computes for tokens ahead of
    the prompt, so their keys and values cannot be shared between candidates (no prefix
    reuse).

    `routed`: `patched` also takes `routing` (a Routing: the chunk's split and example
    indices) as a third argument; the engine passes it only to such deltas.
    """

    config: DeltaConfig
    routed: bool = False
    prompt_length: int = 0
    changes_prefix: bool = False
    hidden_size: int = 0
    dtype: torch.dtype = torch.float32

    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        """(P, d) -> (P, prompt_length, hidden) input embeddings (none by default)."""
        return torch.zeros(z.shape[0], 0, self.hidden_size, device=z.device, dtype=self.dtype)

    def parameters(self, z: torch.Tensor) -> torch.Tensor | None:
        """(P, d) -> (P, D) per-candidate parameters for `patched`, or None."""
        return None

    def patched(self, params: torch.Tensor | None, slots: torch.Tensor | None = None) -> ContextManager:
        """The modules changed for the candidates of `params` (p, D) while entered."""
        return contextlib.nullcontext()

    @property
    def num_parameters(self) -> int:
        """D: the size of the delta generated from z (prompt vectors or module parameters)."""
        return self.prompt_length * self.hidden_size

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


class ProjectedWeights(Delta):
    """A kind whose per-candidate module parameters are `start + scales * P z`: P one
    seeded projection of unit spread (each output coordinate ~ N(0, 1) for z ~ N(0, I)),
    `scales` the per-coordinate spread the kind wants and `start` its fixed starting
    values (None: zero). Such kinds change the modules every token goes through."""

    changes_prefix = True
    start: torch.Tensor | None = None
    # Multiplies every scale of the kind: set so that at projection_scale 1 a random
    # z ~ N(0, I) moves the model about as much as BBT's scaling moves a soft prompt
    # (measured with scripts/probe_scale.py; the weights' own statistics alone overshoot).
    base_scale: float = 1.0

    def _build_projection(self, config: DeltaConfig, device: torch.device, scales: list[torch.Tensor],
                          starts: list[torch.Tensor] | None = None) -> None:
        from backbone_server.projection import make_projection

        self.scales = torch.cat(scales).to(device) * self.base_scale
        self.start = None if starts is None else torch.cat(starts).to(device)
        self.size = len(self.scales)
        self.projection = make_projection(config.projection, in_dim=config.intrinsic_dim, out_dim=self.size,
                                          seed=config.seed, std=1.0 / config.intrinsic_dim ** 0.5, device=device)

    @property
    def num_parameters(self) -> int:
        return self.size

    def parameters(self, z: torch.Tensor) -> torch.Tensor:
        params = self.projection(z) * self.scales
        return params if self.start is None else params + self.start


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
    if config.per_layer_z and config.kind != "deep-prompt":
        raise InvalidArgument(f"per_layer_z (one z block per layer) is for the deep-prompt kind alone, "
                              f"not {config.kind!r}")
    if config.part_dims and "+" not in config.kind:
        raise InvalidArgument(f"part_dims split z among the parts of a combination (KIND+KIND); "
                              f"{config.kind!r} has one part")
    if "+" in config.kind or ":" in config.kind:  # combinations and mixes (deltas/combined.py)
        from backbone_server.deltas.combined import build_composite

        return build_composite(config, backbone)
    factory = DELTA_KINDS.get(config.kind)
    if factory is None:
        raise InvalidArgument(
            f"unknown delta kind {config.kind!r}; this server supports {', '.join(sorted(DELTA_KINDS))}"
        )
    return factory(config, backbone)


# ---- helpers for kinds that change modules ------------------------------------------


def check_no_prompt(config: DeltaConfig) -> None:
    """Weight kinds put no vectors into the input: {prompt} (if any) stays empty."""
    if config.prompt_length != 0:
        raise InvalidArgument(f"delta kind {config.kind!r} has no prompt; prompt_length must be 0, "
                              f"got {config.prompt_length}")


def matches(name: str, suffix: str) -> bool:
    """`name` ends with the dotted module name `suffix` ("v_proj" matches "layers.0.self_attn.v_proj")."""
    return name == suffix or name.endswith("." + suffix)


def find_modules(root: torch.nn.Module, suffixes: tuple[str, ...], accept: Callable[[torch.nn.Module], bool],
                 what: str) -> list[tuple[str, torch.nn.Module]]:
    """The modules under `root` that `accept` takes and whose names end with one of
    `suffixes`, in model order; every suffix must match at least one."""
    candidates = [(name, module) for name, module in root.named_modules() if name and accept(module)]
    unmatched = [s for s in suffixes if not any(matches(name, s) for name, _ in candidates)]
    if unmatched:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
        raise InvalidArgument(f"targets {unmatched} match no {what} of this model; its {what} names end "
                              f"with {', '.join(names) or 'nothing'}")
    return [(name, module) for name, module in candidates if any(matches(name, s) for s in suffixes)]


def default_targets(root: torch.nn.Module, choices: tuple[tuple[str, ...], ...],
                    accept: Callable[[torch.nn.Module], bool], what: str, kind: str) -> tuple[str, ...]:
    """The first group of module-name suffixes in `choices` whose every suffix names some
    module under `root` that `accept` takes (e.g. q_proj/v_proj for Llama, query/value
    for BERT-like models)."""
    names = [name for name, module in root.named_modules() if accept(module)]
    for group in choices:
        if all(any(matches(name, suffix) for name in names) for suffix in group):
            return group
    raise InvalidArgument(f"this model has no {' or '.join('/'.join(group) for group in choices)} {what}; "
                          f"name the {kind} targets explicitly")


@contextlib.contextmanager
def forward_hooks(hooks: list[tuple[torch.nn.Module, Callable]], pre: bool = False):
    """Registers each (module, hook) as a forward hook (with `pre`, as a forward pre-hook
    that also gets the keyword arguments) while entered; always removes them."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True) if pre
                           else module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
