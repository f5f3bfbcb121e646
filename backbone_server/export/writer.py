"""Writing a tuned delta (one z) as an adapter folder, in PEFT's layout.

* `materialise(backbone, config, z)` builds the delta of `config` and has its kind export
  the single vector z (`Delta.export`, in the kind's module): named float32 tensors, the
  adapter config, how to load it and, where that does not give the engine's scores, why.
  PEFT's own types where PEFT has the kind and the export is exact (LORA; PROMPT_TUNING
  with the template's tokens ahead of the prompt folded in; a deep prompt ahead of the
  texts of a causal model as PREFIX_TUNING keys and values), the same layout with blackbox's own
  `peft_type` otherwise (BLACKBOX_ADAPTER, BLACKBOX_BIAS, BLACKBOX_DEEP_PROMPT, applied
  by `backbone_server.export.runtime`). "adamixM:KIND" goes out as KIND with the copies
  merged; combinations are refused.
* `export_delta(...)` writes the folder: adapter_config.json, adapter_model.safetensors
  (float32) and blackbox_export.json (the run's settings, z's norm, the files, how to load,
  whether that reproduces the engine and why not, warnings).

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


def materialise(backbone: Backbone, config: DeltaConfig, z: np.ndarray | torch.Tensor, *,
                template: str | None = None, fold_prefix: bool | None = None,
                base_model: str | None = None) -> Exported:
    """The delta of `config` on `backbone` for one z (d,), as stored tensors.

    `template` (the run's) places a prompt kind's prompt; `fold_prefix` (prompt kinds):
    whether the template's constant tokens ahead of {prompt} go into the export (a soft
    prompt: their embeddings; a deep prompt: PEFT prefix keys and values with theirs), so
    that PEFT's virtual tokens, prepended to the whole input, equal those tokens followed
    by the prompt. None (the default): wherever the kind can; True: or refuse; False: never.
    """
    check_exportable(config)
    delta = build_delta(config, backbone)
    z = torch.as_tensor(np.asarray(z, dtype=np.float32))
    if z.shape != (delta.z_dim,) or not torch.isfinite(z).all():
        raise InvalidArgument(f"z must be {delta.z_dim} finite numbers, got shape {tuple(z.shape)}")
    placement = prompt_placement(backbone, template, config.prompt_length) \
        if _is_prompt_kind(config) and template else None
    request = ExportRequest(backbone, base_model, template, placement, fold_prefix)
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


def _warnings(item: Exported, config: DeltaConfig, z: np.ndarray) -> list[str]:
    """What the user must know before using the export (`blackbox export` prints them)."""
    warnings = []
    if item.why_not_reproduced is not None:
        warnings.append(f"loaded as how_to_load says, this export does not reproduce the run's scores: "
                        f"{item.why_not_reproduced}")
    if not np.any(z):
        # z = 0 is where every run starts, and what it scores as zero-shot: a best z of
        # zeros means no candidate ever beat that start on dev.
        untuned = ("it is the untuned initial prompt, which scores as the run's zero-shot did"
                   if config.prompt_length else "the adapter changes nothing: at z = 0 its delta is zero")
        warnings.append(f"z is all zeros (|z| = 0: the run never beat its zero-shot start), so nothing tuned is "
                        f"exported: {untuned}")
    return warnings


def export_delta(backbone: Backbone, config: DeltaConfig, z: np.ndarray, out: str | Path, *,
                 template: str | None = None, run_config: dict | None = None, base_model: str | None = None,
                 fold_prefix: bool | None = None, overwrite: bool = False) -> dict:
    """Writes the delta of `config` for z as an adapter folder; returns the manifest.

    `template` (the run's) places a prompt kind's prompt; `fold_prefix` as `materialise`
    takes it; `base_model` is recorded as base_model_name_or_path.
    """
    from safetensors.torch import save_file

    z = np.asarray(z, dtype=np.float32)
    item = materialise(backbone, config, z, template=template, fold_prefix=fold_prefix, base_model=base_model)
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
        "why_not_reproduced": item.why_not_reproduced,
        "how_to_load": item.how_to_load,
        "warnings": _warnings(item, config, z),
    }
    write_manifest(out, manifest)
    return manifest


def write_manifest(out: str | Path, manifest: dict) -> None:
    (Path(out) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def save_base(backbone: Backbone, folder: str | Path) -> None:
    """The base model and tokenizer as a Hugging Face folder (for models built in code)."""
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
