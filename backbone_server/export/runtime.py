"""Using an export on a plain model, for the formats PEFT has no type for: the user side
of `blackbox export`. Each `apply_*` installs hooks on an ordinary transformers model
that reproduce the engine's scores for the delta of one z; `splice_prompt` and
`load_prompt` put a deep prompt's input vectors (or a soft prompt's, where PEFT cannot
place it) into `inputs_embeds`.

These are a separate, single-model implementation from the engine's batched hooks on
purpose: the export tests check one against the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backbone_server.deltas.exported import PEFT_PREFIX
from backbone_server.deltas.hooks import hidden_of, with_hidden
from backbone_server.errors import InvalidArgument
from backbone_server.export.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS


class Hooks:
    """The hooks an `apply_*` function installed: iterable handles; `remove()` (or leaving
    a `with` block) takes them all off the model again."""

    def __init__(self, handles: list | None = None):
        self.handles = list(handles or [])

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self):
        return iter(self.handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _read_export(folder: str | Path, *peft_types: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    if adapter.get("peft_type") not in peft_types:
        raise InvalidArgument(f"{folder} holds a {adapter.get('peft_type')} adapter, not {' or '.join(peft_types)}")
    return adapter, load_file(str(folder / ADAPTER_WEIGHTS))


def apply_bias_shift(model: torch.nn.Module, folder: str | Path) -> Hooks:
    """Adds the shifts of a BLACKBOX_BIAS export to `model`'s module outputs (forward
    hooks); returns the hooks (`remove()` or a `with` block undoes it)."""
    _, tensors = _read_export(folder, "BLACKBOX_BIAS")
    hooks = Hooks()
    try:  # a module the model lacks leaves it as it was, like apply_adapters
        for key, shift in tensors.items():
            path = key.removeprefix(PEFT_PREFIX).removesuffix(".bias_shift")
            module = model.get_submodule(path)

            def hook(module, args, output, shift=shift):
                return output + shift.to(device=output.device, dtype=output.dtype)

            hooks.handles.append(module.register_forward_hook(hook))
    except Exception:
        hooks.remove()
        raise
    return hooks


def apply_adapters(model: torch.nn.Module, folder: str | Path) -> Hooks:
    """Installs the bottleneck adapters of a BLACKBOX_ADAPTER export on `model` (a forward
    hook per target module: y -> y + W_up gelu(W_down y), on the first element of a
    module's tuple output); returns the hooks (`remove()` or a `with` block undoes it)."""
    adapter, tensors = _read_export(folder, "BLACKBOX_ADAPTER")
    if adapter.get("activation") != "gelu":
        raise InvalidArgument(f"unknown adapter activation {adapter.get('activation')!r}")
    hooks = Hooks()
    try:
        for path in adapter["target_modules"]:
            down = tensors[f"{PEFT_PREFIX}{path}.adapter_down.weight"]
            up = tensors[f"{PEFT_PREFIX}{path}.adapter_up.weight"]
            hooks.handles.append(model.get_submodule(path).register_forward_hook(_adapter_hook(down, up)))
    except Exception:
        hooks.remove()
        raise
    return hooks


def _adapter_hook(down: torch.Tensor, up: torch.Tensor):
    def hook(module, args, output):
        y = output[0] if isinstance(output, tuple) else output
        d, u = down.to(device=y.device, dtype=y.dtype), up.to(device=y.device, dtype=y.dtype)
        y = y + F.gelu(y @ d.T) @ u.T
        return (y, *output[1:]) if isinstance(output, tuple) else y

    return hook


def load_prompt(folder: str | Path) -> torch.Tensor:
    """The input prompt vectors (n x h, float32) of a BLACKBOX_DEEP_PROMPT export, or the
    virtual tokens of a PROMPT_TUNING one: for `splice_prompt`, which puts them where the
    template said {prompt}, as PEFT cannot for a prompt after the text."""
    return _read_export(folder, "BLACKBOX_DEEP_PROMPT", "PROMPT_TUNING")[1]["prompt_embeddings"]


def _prompt_positions(positions, rows: int, n: int, device) -> torch.Tensor:
    """`positions` ((n,) for every row, or (rows, n)) as a (rows, n) long tensor."""
    if not isinstance(positions, torch.Tensor):
        positions = torch.as_tensor(np.asarray(positions, dtype=np.int64))
    positions = positions.to(device=device, dtype=torch.long)
    if positions.dim() == 1:
        positions = positions[None].expand(rows, -1)
    if positions.shape != (rows, n):
        raise InvalidArgument(f"prompt positions must be {n} per row (shape ({n},) or ({rows}, {n})), "
                              f"got shape {tuple(positions.shape)}")
    return positions


def splice_prompt(model: torch.nn.Module, input_ids, prompt: torch.Tensor, positions) -> torch.Tensor:
    """inputs_embeds for `model`: the input embeddings of `input_ids` ((L,) or (B, L); the
    ids at the prompt positions are placeholders, any valid id) with the prompt vectors
    (n x h) in place of those at `positions` ((n,) for every row or (B, n))."""
    embeddings = model.get_input_embeddings()
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=embeddings.weight.device)
    if ids.dim() == 1:
        ids = ids[None]
    embeds = embeddings(ids)
    n = prompt.shape[0]
    where = _prompt_positions(positions, ids.shape[0], n, embeds.device)
    rows = torch.arange(ids.shape[0], device=embeds.device)[:, None]
    values = prompt.to(device=embeds.device, dtype=embeds.dtype)[None].expand(ids.shape[0], -1, -1)
    return embeds.index_put((rows, where), values)


class DeepPromptHooks(Hooks):
    """The pre-hooks of `apply_deep_prompt`; `positions` (settable) says where the prompt
    sits in the rows of the next forward."""

    def __init__(self, positions, prompt_length: int):
        super().__init__()
        self.prompt_length = prompt_length
        self.positions = positions


def apply_deep_prompt(model: torch.nn.Module, folder: str | Path, prompt_positions) -> DeepPromptHooks:
    """Adds the per-layer offsets of a BLACKBOX_DEEP_PROMPT export to the hidden states
    entering each layer l >= 1 (forward pre-hooks) at `prompt_positions`: (n,) positions
    for every row, or (B, n) per row; `hooks.positions = ...` changes them between
    forwards. The input prompt is the caller's: build inputs_embeds with `splice_prompt`
    at the same positions. A forward whose hidden states do not reach the last position
    (a decoding step with a KV cache, where the prompt is in the cache) is left alone.
    Returns the hooks (`remove()` or a `with` block undoes it)."""
    adapter, tensors = _read_export(folder, "BLACKBOX_DEEP_PROMPT")
    n = int(adapter["num_virtual_tokens"])
    hooks = DeepPromptHooks(prompt_positions, n)
    try:
        for l, path in enumerate(adapter["layer_modules"]):
            if l == 0:
                continue
            offset = tensors[f"layers.{l}.prompt_offset"]
            hooks.handles.append(model.get_submodule(path).register_forward_pre_hook(
                _deep_prompt_hook(offset, hooks), with_kwargs=True))
    except Exception:
        hooks.remove()
        raise
    return hooks


def _deep_prompt_hook(offset: torch.Tensor, hooks: DeepPromptHooks):
    def hook(module, args, kwargs):
        hidden = hidden_of(args, kwargs)
        where = _prompt_positions(hooks.positions, hidden.shape[0], hooks.prompt_length, hidden.device)
        if where.numel() == 0 or int(where.max()) >= hidden.shape[1]:
            return None
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        values = offset.to(device=hidden.device, dtype=hidden.dtype)[None].expand(hidden.shape[0], -1, -1)
        return with_hidden(args, kwargs, hidden.index_put((rows, where), values, accumulate=True))

    return hook
