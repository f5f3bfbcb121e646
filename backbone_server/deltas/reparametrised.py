"""z reparametrised on top of a built delta, for intrinsic-dimension studies.

Both wrappers keep the inner delta's start (its z = 0: p0, the model's own weights) and
change only how z moves away from it; everything else (how the engine applies the
delta: `patched`, `key_values`, `kv_prompt`, `layout`, ...) is the inner delta's.

- `StructureAware` (Aghajanyan et al. 2021, SAID): z = [z_inner | s], one s per group
  (the input prompt, then each transformer layer the delta touches), and each group's
  offset from the start is scaled by (1 + s_group): at s = 0 it is the plain subspace.
- `LearnedSubspace` (Qin et al. 2021): the offset is z's combination of a hosted
  subspace's directions (`backbone_server.subspace`), no random projection at all.
"""

from __future__ import annotations

import torch

from backbone_server.deltas.budget import FLOAT_BYTES, current_budget
from backbone_server.errors import InvalidArgument
from backbone_server.subspace import Subspace


class Reparametrised:
    """A delta whose z maps onto another's offsets; every other attribute is the inner's."""

    def __init__(self, inner, device: torch.device):
        self.inner = inner
        current_budget().reserve((inner.prompt_length * inner.hidden_size + inner.layout.size) * FLOAT_BYTES,
                                 f"the start of a {type(self).__name__} delta")
        probe = torch.zeros(1, inner.z_dim, device=device)
        with torch.no_grad():
            self.start_prompts = inner.prompts(probe)  # (1, n, hidden) or (1, 0, hidden)
            self.start_params = inner.parameters(probe)  # (1, D_params) or None

    def __getattr__(self, name):
        if name == "inner":  # not set yet: no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def prompt_size(self) -> int:
        return self.start_prompts[0].numel()

    @property
    def z_dim(self) -> int:
        return sum(size for _, size in self.z_blocks)

    def export(self, z, request):
        raise InvalidArgument(f"a {type(self).__name__} delta cannot be exported yet: export the run's z through a "
                              "random projection instead")


class StructureAware(Reparametrised):
    def __init__(self, inner, device: torch.device):
        super().__init__(inner, device)
        groups: dict[object, int] = {}
        current_budget().reserve(inner.layout.size * 8, "SAID's group of each parameter")  # int64 each
        if self.prompt_size:
            groups["input"] = 0
        columns = []
        for segment in inner.layout:
            key = segment.layer if segment.layer is not None else "other"
            columns.append(torch.full((segment.size,), groups.setdefault(key, len(groups)), dtype=torch.long))
        self.param_groups = torch.cat(columns).to(device) if columns else None
        self.group_names = [f"layer{key}" if isinstance(key, int) else key for key in groups]
        if not self.group_names:
            raise InvalidArgument("SAID needs a delta with a prompt or module parameters to scale")

    @property
    def z_blocks(self) -> list[tuple[str, int]]:
        return [*self.inner.z_blocks, ("said_scales", len(self.group_names))]

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.inner.z_dim
        return z[:, :d], 1 + z[:, d:]

    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        inner_z, scales = self._split(z)
        prompts = self.inner.prompts(inner_z)
        if not self.prompt_size:
            return prompts
        scale = scales[:, 0].to(prompts.dtype)[:, None, None]
        return self.start_prompts + scale * (prompts - self.start_prompts)

    def parameters(self, z: torch.Tensor) -> torch.Tensor | None:
        inner_z, scales = self._split(z)
        params = self.inner.parameters(inner_z)
        if params is None or self.param_groups is None:
            return params
        return self.start_params + scales[:, self.param_groups].to(params.dtype) * (params - self.start_params)


class LearnedSubspace(Reparametrised):
    def __init__(self, inner, device: torch.device, subspace: Subspace, dim: int, name: str):
        super().__init__(inner, device)
        size = self.prompt_size + (0 if self.start_params is None else self.start_params.shape[1])
        if subspace.delta_size != size:
            meta = subspace.meta
            raise InvalidArgument(
                f"subspace {name!r} was fitted on a {meta.get('kind', '?')} delta of D = {subspace.delta_size} "
                f"(prompt length {meta.get('prompt_length', '?')}, model {meta.get('model', '?')}); this session's "
                f"delta has D = {size}: use the kind, prompt length and model it was fitted on")
        if not 1 <= dim <= subspace.dim:
            raise InvalidArgument(f"subspace {name!r} has {subspace.dim} directions; intrinsic_dim must be 1 .. "
                                  f"{subspace.dim}, got {dim}")
        current_budget().reserve(dim * size * subspace.basis.itemsize, f"{dim:,} directions of subspace {name!r}")
        self.directions = torch.tensor(subspace.basis[:dim] * subspace.scales[:dim, None], device=device)
        self.dim = dim
        self.description = f"{inner.description}, moved along {dim} learned directions of subspace {name!r}"

    @property
    def z_blocks(self) -> list[tuple[str, int]]:
        return [("z", self.dim)]

    def _offsets(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.directions.dtype) @ self.directions

    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        if not self.prompt_size:
            return self.start_prompts.expand(z.shape[0], *self.start_prompts.shape[1:])
        offsets = self._offsets(z)[:, :self.prompt_size].reshape(z.shape[0], *self.start_prompts.shape[1:])
        return self.start_prompts + offsets.to(self.start_prompts.dtype)

    def parameters(self, z: torch.Tensor) -> torch.Tensor | None:
        if self.start_params is None:
            return None
        return self.start_params + self._offsets(z)[:, self.prompt_size:].to(self.start_params.dtype)
