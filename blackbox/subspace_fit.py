"""`blackbox subspace fit`: a learned task subspace from the tuned deltas of other runs.

Each run's best z is turned back into its full-space offset (the delta it generates minus
its z = 0), on the run's model loaded here as `blackbox export` does; the offsets of all
runs are stacked, and their principal directions (an SVD, uncentred: z = 0 stays each
session's own start) are the subspace. Qin et al. (2021) find that a subspace learned
on many tasks recovers most of prompt tuning on tasks held out of the fit; `--exclude-task`
holds one out. The file (`backbone_server.subspace`) is hosted by a server with
`--subspace NAME=FILE` and selected by `--projection subspace:NAME`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from blackbox.runlog import RunDirError


def find_runs(paths: Sequence[str | Path], exclude_tasks: Sequence[str] = ()) -> list[Path]:
    """Finished run folders (config.json and best_z.npy) at or under `paths`, in order,
    without those of `exclude_tasks`."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise RunDirError(f"--runs {path}: no such folder")
        candidates = [path] if (path / "best_z.npy").exists() else sorted(p.parent for p in path.rglob("best_z.npy"))
        found += [run for run in candidates if (run / "config.json").exists() and run not in found]
    excluded = set(exclude_tasks)
    kept = [run for run in found if json.loads((run / "config.json").read_text()).get("task") not in excluded]
    if not kept:
        raise RunDirError(f"no finished run (config.json and best_z.npy) under {', '.join(map(str, paths))}"
                          + (f" outside the excluded tasks {', '.join(sorted(excluded))}" if excluded else ""))
    return kept


def _same(configs: list[dict], runs: list[Path], key: str, default=None):
    values = {json.dumps(config.get(key, default)) for config in configs}
    if len(values) > 1:
        by_value = {}
        for config, run in zip(configs, runs):
            by_value.setdefault(json.dumps(config.get(key, default)), run)
        raise RunDirError(f"the runs differ in {key} ({', '.join(f'{v} in {r}' for v, r in by_value.items())}): "
                          "a subspace is fitted on runs of one delta kind, prompt length and model")
    return configs[0].get(key, default)


def fit_subspace(run_dirs: Sequence[Path], out: str | Path, dim: int = 0, model: str | None = None,
                 device: str = "cpu") -> dict:
    """Fits and saves the subspace of `run_dirs`; returns its metadata."""
    import torch

    from backbone_server.deltas import DeltaConfig, build_delta
    from backbone_server.errors import ServiceError
    from backbone_server.models import BUNDLED_MODEL, load_backbone
    from backbone_server.subspace import SUBSPACE_PREFIX, Subspace, save_subspace
    from blackbox.export import delta_spec_of_run

    if dim < 0:
        raise ValueError(f"--dim must be >= 0 (0: as many directions as the runs give), got {dim}")
    runs = list(run_dirs)
    configs = [json.loads((run / "config.json").read_text()) for run in runs]
    for config, run in zip(configs, runs):
        if config.get("said") or str(config.get("projection", "")).startswith(SUBSPACE_PREFIX):
            raise RunDirError(f"{run} was tuned through a SAID or learned subspace; fit on runs of a plain projection")
    kind = _same(configs, runs, "delta")
    prompt_length = _same(configs, runs, "prompt_length")
    name = model or _same(configs, runs, "model") or BUNDLED_MODEL
    dtype = json.loads((runs[0] / "result.json").read_text()).get("dtype", "float32") \
        if (runs[0] / "result.json").exists() else "float32"
    try:
        backbone = load_backbone(name, device=device, dtype=dtype)
        offsets = []
        for config, run in zip(configs, runs):
            delta = build_delta(DeltaConfig(**dataclasses.asdict(delta_spec_of_run(config))), backbone)
            z = torch.tensor(np.load(run / "best_z.npy"), dtype=torch.float32, device=backbone.device)[None]
            offsets.append(_offset(delta, z))
    except ServiceError as error:
        raise ValueError(str(error)) from None
    stacked = np.stack(offsets).astype(np.float64)  # (R, D)
    _, singular, directions = np.linalg.svd(stacked, full_matrices=False)
    rank = int((singular > singular[0] * 1e-6).sum()) if singular.size and singular[0] > 0 else 0
    if rank == 0:
        raise ValueError("the runs' deltas are all zero: nothing to fit")
    k = min(dim or rank, rank)
    if dim and dim > rank:
        print(f"note: {len(runs)} runs span {rank} directions; the subspace has {rank}, not {dim}")
    energy = singular ** 2 / (singular ** 2).sum()
    meta = {
        "kind": kind, "prompt_length": prompt_length, "model": name, "delta_size": int(stacked.shape[1]),
        "dim": k, "runs": [str(run.resolve()) for run in runs],
        "tasks": sorted({str(config.get("task")) for config in configs}),
        "explained": [float(e) for e in energy[:k]], "explained_total": float(energy[:k].sum()),
        "how": "uncentred SVD of the runs' full-space offsets (delta(best z) - delta(0)); scales: the RMS of the "
               "runs' coordinates along each direction",
    }
    subspace = Subspace(directions[:k].astype(np.float32), (singular[:k] / np.sqrt(len(runs))).astype(np.float32),
                        meta)
    path = save_subspace(subspace, out)
    return {**meta, "file": str(path), "bytes": path.stat().st_size}


def _offset(delta, z) -> np.ndarray:
    """The full-space offset z generates: prompt vectors, then module parameters, flattened."""
    import torch

    with torch.no_grad():
        zero = torch.zeros_like(z)
        parts = [(delta.prompts(z) - delta.prompts(zero)).reshape(-1)]
        params = delta.parameters(z)
        if params is not None:
            parts.append((params - delta.parameters(zero)).reshape(-1))
    return torch.cat(parts).float().cpu().numpy()
