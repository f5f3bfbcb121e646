"""Building the delta a DeltaConfig's form names, and what GetInfo says about the kinds."""

from __future__ import annotations

import dataclasses

from backbone_server.deltas.adamix import DEFAULT_COPIES, MAX_COPIES, AdaMixDelta, mixable_kinds
from backbone_server.deltas.base import DELTA_KINDS, Delta, DeltaConfig, kind_class, per_layer_kinds
from backbone_server.deltas.budget import MAX_DELTA_BYTES, delta_budget
from backbone_server.deltas.combined import CombinedDelta, not_exportable
from backbone_server.deltas.reparametrised import LearnedSubspace, StructureAware
from backbone_server.errors import InvalidArgument, shown
from backbone_server.subspace import SUBSPACE_PREFIX, Subspace
from blackbox.v1.delta_spec import ADAMIX, UNIPELT, KindInfo


def build_delta(config: DeltaConfig, backbone, subspaces: dict[str, Subspace] | None = None,
                max_bytes: int = MAX_DELTA_BYTES) -> Delta:
    """The delta `config` asks for; "subspace:NAME" projections come from `subspaces`,
    the ones the server hosts. What it pins (projections, scales, starts: all its parts
    and copies together) may not exceed `max_bytes`, each piece checked before it is
    allocated (RESOURCE_EXHAUSTED); sizes beyond the model are INVALID_ARGUMENT."""
    max_length = getattr(backbone, "max_length", None)
    if max_length is not None and config.prompt_length > max_length:
        raise InvalidArgument(f"prompt_length {config.prompt_length} is more than the {max_length} tokens this "
                              f"model takes; choose at most {max_length}, less the template's and the texts' tokens")
    with delta_budget(max_bytes):
        return _build(config, backbone, subspaces)


def _build(config: DeltaConfig, backbone, subspaces: dict[str, Subspace] | None) -> Delta:
    if config.projection.startswith(SUBSPACE_PREFIX):
        name = config.projection[len(SUBSPACE_PREFIX):]
        if name not in (subspaces or {}):
            hosted = ", ".join(sorted(subspaces or {})) or "none"
            raise InvalidArgument(f"this server hosts no subspace {shown(name)} (hosted: {hosted}); an operator "
                                  "hosts one with --subspace NAME=FILE")
        # The inner delta gives the start and the layout; its own projection is never used
        # (the smallest z it takes: one coordinate, or a few per part of a combination).
        inner_dim = 1 if config.form.single else 4 * (len(config.form.parts) + backbone.num_layers)
        inner = _build_form(dataclasses.replace(config, projection="normal", intrinsic_dim=inner_dim, said=False,
                                                part_dims=()), backbone)
        delta = LearnedSubspace(inner, backbone.device, subspaces[name], config.intrinsic_dim, name)
    else:
        delta = _build_form(dataclasses.replace(config, said=False) if config.said else config, backbone)
    return StructureAware(delta, backbone.device) if config.said else delta


def _build_form(config: DeltaConfig, backbone) -> Delta:
    form = config.form
    if config.part_dims and len(form.parts) == 1:
        raise InvalidArgument(f"part_dims split z among the parts of a combination (KIND+KIND); "
                              f"{config.kind!r} has one part")
    if config.per_layer_z and form.single is None:
        raise InvalidArgument(f"per_layer_z (one z block per layer) is for {', '.join(per_layer_kinds())} "
                              f"alone, not {config.kind!r}")
    if form.mix == ADAMIX:
        return AdaMixDelta(config, backbone, form.parts, form.copies)
    if form.single is None:
        return CombinedDelta(config, backbone, form.parts, gated=form.mix == UNIPELT)
    return kind_class(form.single)(config, backbone)


def check_exportable(config: DeltaConfig) -> None:
    """Refuses a combination before anything is built: no export format holds one."""
    if config.form.mix != ADAMIX and config.form.single is None:
        raise not_exportable(config.kind)


def kind_infos(backbone=None) -> list[KindInfo]:
    """Every registered kind and what it takes, by name (with what it costs on `backbone`)."""
    return [DELTA_KINDS[name].info(backbone) for name in sorted(DELTA_KINDS)]


def delta_forms() -> list[str]:
    """How the kinds combine into one delta, in words (GetInfo's delta_forms)."""
    gated = [name for name, cls in DELTA_KINDS.items() if cls.gated_roles]
    return [
        "KIND+KIND[+KIND...]: the parts share z (equal slices, the remainder to the first), at most one prompt kind",
        f"unipelt:KIND[+KIND...]: per-layer gates sigmoid(z_gate) on every part of {', '.join(gated)}",
        f"adamix[M]:KIND: M copies (default {DEFAULT_COPIES}, at most {MAX_COPIES}) of one of "
        f"{', '.join(mixable_kinds())}, routed per example on 'train' and '*-routed' splits, merged by averaging "
        "elsewhere",
        f"{' or '.join(per_layer_kinds())} with per_layer_z: one block of intrinsic_dim coordinates of z per layer",
    ]
