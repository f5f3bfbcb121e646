"""`blackbox export`: a finished run folder (config.json, result.json, best_z.npy) as an
adapter folder. This is the run-folder glue; the delta's tensors are written by the
local server side (`backbone_server.export`), on the run's model loaded here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from blackbox.client import DeltaSpec, KindInfo
from blackbox.runlog import RunDirError, RunLog
from blackbox.tune_config import TuneConfig, delta_spec


def delta_spec_of_run(config: dict, kinds: Mapping[str, KindInfo] | None = None) -> DeltaSpec:
    """The DeltaSpec a `blackbox tune` run's config.json describes: the tuner's own, rebuilt
    from the stored settings and what the `kinds` take (default: this machine's server)."""
    if kinds is None:
        from backbone_server.deltas import kind_infos

        kinds = {kind.name: kind for kind in kind_infos()}
    fields = {f.name for f in dataclasses.fields(TuneConfig)}
    for key in ("delta", "dim", "seed"):
        if key not in config:
            raise RunDirError(f"the run's config.json lacks {key!r}")
    try:
        return delta_spec(TuneConfig(**{k: v for k, v in config.items() if k in fields}), kinds,
                          config.get("init_text", ""))
    except (TypeError, ValueError) as error:
        raise RunDirError(f"the run's config.json does not describe a run: {error}") from None


def export_run(run_dir: str | Path, out: str | Path, model: str | None = None, device: str = "cpu",
               dtype: str | None = None, fold_prefix: bool | None = None, overwrite: bool = False) -> dict:
    """Exports the best z of a finished run folder; returns the manifest.

    The model is the run's (or `model`), loaded in the run's dtype unless `dtype` says
    otherwise (the delta's scales are taken from the weights as loaded). A model built in
    code (tiny-llama, tiny-roberta, tiny-gpt2) is saved in `out/base` so the export loads on
    its own; a GGUF model's adapter names its converted safetensors folder as its base.
    `fold_prefix`: see `backbone_server.export.materialise` (None: wherever it applies).
    """
    from backbone_server.deltas import DeltaConfig
    from backbone_server.errors import ServiceError
    from backbone_server.export import BASE_FOLDER, export_delta, save_base, write_manifest
    from backbone_server.models import BUNDLED_MODEL, TINY_MODELS, load_backbone, model_folder

    run_dir, out = Path(run_dir), Path(out)
    run_config, z, result = RunLog.read_finished(run_dir)
    spec = delta_spec_of_run(run_config)
    if spec.said or spec.projection.startswith("subspace:"):
        raise ValueError(f"{run_dir} was tuned through {'SAID scales' if spec.said else 'a learned subspace'}; "
                         "no export format holds those yet: export a run of a plain projection")
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # early, before loading the model
        raise ValueError(f"{out} is not empty; choose another folder or pass --overwrite")
    name = model or run_config.get("model") or BUNDLED_MODEL
    try:
        backbone = load_backbone(name, device=device, dtype=dtype or result.get("dtype") or "float32")
        if name in TINY_MODELS:
            base_model = str((out / BASE_FOLDER).resolve())
        else:  # PEFT loads its base from a folder: a GGUF file's is its converted copy
            base_model = str(model_folder(name).resolve())
        manifest = export_delta(backbone, DeltaConfig(**dataclasses.asdict(spec)), z, out,
                                template=run_config.get("template"), run_config=run_config,
                                base_model=base_model, fold_prefix=fold_prefix, overwrite=overwrite)
    except ServiceError as error:
        raise ValueError(str(error)) from None
    manifest.update(run=str(run_dir.resolve()), run_model=run_config.get("model"))
    if result.get("label_bias"):
        # The offsets live on the client's side of the scores: no adapter format holds them.
        manifest["label_bias"] = result["label_bias"]
        manifest["warnings"].append(
            "the run scored every candidate with a label bias (--calibrate): add label_bias[c] to the logit of "
            "label word c to reproduce its predictions; the adapter holds none")
    if name in TINY_MODELS:
        save_base(backbone, out / BASE_FOLDER)
        manifest["files"].append(BASE_FOLDER + "/")
    write_manifest(out, manifest)
    return manifest
