"""Writing a tuned delta (one z) as an adapter folder, in PEFT's layout.

* `materialise(backbone, config, z)` builds the delta of `config` and has its kind export
  the single vector z (`Delta.export`, in the kind's module): named float32 tensors, the
  adapter config and how to load it. PEFT's own types where PEFT has the kind and the
  export is exact (LORA; PROMPT_TUNING; a deep prompt ahead of the texts of a causal
  model as PREFIX_TUNING keys and values), the same layout with blackbox's own
  `peft_type` otherwise (BLACKBOX_ADAPTER, BLACKBOX_BIAS, BLACKBOX_DEEP_PROMPT, applied
  by `backbone_server.export.runtime`). "adamixM:KIND" goes out as KIND with the copies
  merged; combinations are refused.
* `export_delta(...)` writes the folder: adapter_config.json, adapter_model.safetensors
  (float32) and blackbox_export.json (the run's settings, z's norm, the files, how to load).

Pure torch and safetensors: PEFT is needed only to load the result, not to write it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from backbone_server.deltas import DeltaConfig, build_delta
from backbone_server.deltas.build import check_exportable
from backbone_server.deltas.base import DELTA_KINDS
from backbone_server.deltas.exported import Exported, ExportRequest, prompt_placement
from backbone_server.errors import InvalidArgument
from backbone_server.export.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FOLDER, MANIFEST, OUR_FILES
from backbone_server.models import Backbone

EXPORT_FORMAT = 1


def materialise(backbone: Backbone, config: DeltaConfig, z: np.ndarray | torch.Tensor,
                fold_prefix: list[int] | None = None, *, base_model: str | None = None,
                template: str | None = None, placement: dict | None = None) -> Exported:
    """The delta of `config` on `backbone` for one z (d,), as stored tensors.

    `fold_prefix` (prompt kinds only): token ids put ahead of the prompt (a soft prompt:
    their embeddings; a deep prompt: PEFT prefix keys and values with theirs), so that
    PEFT's virtual tokens (prepended to the whole input) equal the tokens ahead of
    {prompt} followed by the prompt.
    """
    check_exportable(config)
    delta = build_delta(config, backbone)
    z = torch.as_tensor(np.asarray(z, dtype=np.float32))
    if z.shape != (delta.z_dim,) or not torch.isfinite(z).all():
        raise InvalidArgument(f"z must be {delta.z_dim} finite numbers, got shape {tuple(z.shape)}")
    request = ExportRequest(backbone, base_model, template, placement,
                            None if fold_prefix is None else tuple(fold_prefix))
    with torch.no_grad():
        return delta.export(z[None].to(backbone.device), request)


def _is_prompt_kind(config: DeltaConfig) -> bool:
    """One kind that takes a prompt (the placement of a combination's prompt is not exported)."""
    kind = config.form.single
    return kind in DELTA_KINDS and DELTA_KINDS[kind].takes_prompt


def _prepare_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InvalidArgument(f"{out} is not empty; choose another folder or pass --overwrite")
        for name in OUR_FILES:
            (out / name).unlink(missing_ok=True)
        if (out / BASE_FOLDER / "config.json").exists():
            shutil.rmtree(out / BASE_FOLDER)
    out.mkdir(parents=True, exist_ok=True)


def export_delta(backbone: Backbone, config: DeltaConfig, z: np.ndarray, out: str | Path, *,
                 template: str | None = None, run_config: dict | None = None, base_model: str | None = None,
                 fold_prefix: bool = False, overwrite: bool = False) -> dict:
    """Writes the delta of `config` for z as an adapter folder; returns the manifest.

    `template` (the run's) is needed for a soft prompt's placement and for `fold_prefix`;
    `base_model` is recorded as base_model_name_or_path.
    """
    from safetensors.torch import save_file

    z = np.asarray(z, dtype=np.float32)
    placement = prompt_placement(backbone, template, config.prompt_length) \
        if _is_prompt_kind(config) and template else None
    folded = None
    if fold_prefix:
        if placement is None:
            raise InvalidArgument("folding the tokens ahead of the prompt needs a soft or deep prompt and its "
                                  "template")
        if placement["tokens_before_prompt"] is None:
            raise InvalidArgument("the run's template puts text ahead of the prompt; only the constant tokens "
                                  "of a prompt that precedes the texts can be folded into it")
        folded = placement["tokens_before_prompt"]
    item = materialise(backbone, config, z, fold_prefix=folded, base_model=base_model, template=template,
                       placement=placement)
    out = Path(out)
    _prepare_folder(out, overwrite)
    save_file(item.tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", "blackbox_kind": item.kind})
    (out / ADAPTER_CONFIG).write_text(json.dumps(item.adapter_config, indent=2) + "\n")
    manifest = {
        "format": EXPORT_FORMAT,
        "kind": item.kind,
        "peft_type": item.adapter_config["peft_type"],
        "description": item.description,
        "model": backbone.name,
        "architecture": backbone.architecture,
        "dtype": str(backbone.dtype).removeprefix("torch."),
        "base_model": base_model,
        "delta_config": dataclasses.asdict(config),
        "run_config": run_config,
        "z_dim": int(z.shape[0]),
        "z_norm": float(np.linalg.norm(z)),
        "tensors": {name: list(tensor.shape) for name, tensor in item.tensors.items()},
        "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST],
        "prompt": item.prompt,
        "reproduces_engine": item.reproduces_engine,
        "how_to_load": item.how_to_load,
    }
    write_manifest(out, manifest)
    return manifest


def write_manifest(out: str | Path, manifest: dict) -> None:
    (Path(out) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def save_base(backbone: Backbone, folder: str | Path) -> None:
    """The base model and tokenizer as a Hugging Face folder (for models built in code)."""
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
