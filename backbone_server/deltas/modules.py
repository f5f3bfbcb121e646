"""Finding the modules a delta changes: by name suffix, the transformer layers, and where
each module sits in the model (its path and layer).

A projection is a Linear module or transformers' Conv1D (GPT-2's attention and MLP): both
map x to x W^T + b, Conv1D storing W transposed as (in, out). The weight kinds read a
projection's widths with `features` and hook its input or output, so they never depend on
how its weight is stored.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

from backbone_server.errors import InvalidArgument, shown

PROJECTIONS = "Linear/Conv1D modules"  # what `is_projection` accepts, in error messages


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    """A projection whose weight is stored (in, out)."""
    return isinstance(module, Conv1D)


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out): the widths of a projection's input and output."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def type_names(modules: Iterable[tuple[str, nn.Module]]) -> str:
    """The modules' classes, for descriptions ("Linear", "Conv1D")."""
    return "/".join(sorted({type(module).__name__ for _, module in modules}))


def name_endings(root: nn.Module, accept: Callable[[nn.Module], bool]) -> str:
    """The distinct last parts of the names of the modules under `root` that `accept`
    takes (the suffixes a user can name as targets), without list indices."""
    names = {name.rsplit(".", 1)[-1] for name, module in root.named_modules() if name and accept(module)}
    return ", ".join(sorted(name for name in names if not name.isdigit())) or "nothing"


def matches(name: str, suffix: str) -> bool:
    """`name` ends with the dotted module name `suffix` ("v_proj" matches "layers.0.self_attn.v_proj")."""
    return name == suffix or name.endswith("." + suffix)


def find_modules(root: nn.Module, suffixes: tuple[str, ...], accept: Callable[[nn.Module], bool],
                 what: str) -> list[tuple[str, nn.Module]]:
    """The modules under `root` that `accept` takes and whose names end with one of
    `suffixes`, in model order; every suffix must match at least one."""
    candidates = [(name, module) for name, module in root.named_modules() if name and accept(module)]
    unmatched = [s for s in suffixes if not any(matches(name, s) for name, _ in candidates)]
    if unmatched:
        raise InvalidArgument(f"targets {shown(unmatched)} match no {what} of this model; the names of its {what} "
                              f"end with {name_endings(root, accept)}")
    return [(name, module) for name, module in candidates if any(matches(name, s) for s in suffixes)]


def default_targets(root: nn.Module, choices: tuple[tuple[str, ...], ...], accept: Callable[[nn.Module], bool],
                    what: str, kind: str) -> tuple[str, ...]:
    """The first group of module-name suffixes in `choices` whose every suffix names some
    module under `root` that `accept` takes (e.g. q_proj/v_proj for Llama, query/value
    for BERT-like models, c_attn for GPT-2)."""
    names = [name for name, module in root.named_modules() if accept(module)]
    for group in choices:
        if all(any(matches(name, suffix) for name in names) for suffix in group):
            return group
    raise InvalidArgument(f"this model has no {' or '.join('/'.join(group) for group in choices)} {what}; "
                          f"name the {kind} targets explicitly (the names of its {what} end with "
                          f"{name_endings(root, accept)})")


def find_layers(body: nn.Module, num_layers: int) -> list[nn.Module]:
    """The transformer layers: the first ModuleList of `num_layers` modules in `body`
    (Llama: model.layers; BERT/RoBERTa: encoder.layer; GPT-2: h)."""
    for _, module in body.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return list(module)
    raise InvalidArgument(f"found no list of {num_layers} layers in this model; deep prompts need one")


class ModulePlaces:
    """Where the modules of a backbone sit: each one's path in `backbone.model` (what
    PEFT and export name it by) and the transformer layer holding it (None outside the
    layers, e.g. a final norm, or in a model without a list of layers)."""

    def __init__(self, backbone):
        self._paths = {id(module): name for name, module in backbone.model.named_modules()}
        try:
            layers = find_layers(backbone.body, backbone.num_layers)
        except InvalidArgument:
            layers = []
        self._layers = {id(module): index for index, layer in enumerate(layers) for module in layer.modules()}

    def path(self, module: nn.Module) -> str:
        if id(module) not in self._paths:
            raise InvalidArgument(f"module {type(module).__name__} is not part of the model")
        return self._paths[id(module)]

    def layer(self, module: nn.Module) -> int | None:
        return self._layers.get(id(module))
