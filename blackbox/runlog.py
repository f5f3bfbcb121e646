"""A run's files: config.json, log.jsonl (one line per generation), result.json, best_z.npy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

RUN_FILES = ("config.json", "log.jsonl", "result.json", "best_z.npy", "curve.png")


class RunDirError(ValueError):
    pass


def _write_atomic(path: Path, text: str) -> None:
    """Readers never see half a file, even if the run is killed mid-write."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


class RunLog:
    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.dir = Path(out)
        existing = [name for name in RUN_FILES if (self.dir / name).exists()]
        if existing and not overwrite:
            raise RunDirError(
                f"{self.dir} already holds a run ({', '.join(existing)}); "
                "choose another --out or pass --overwrite"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        if existing:
            for name in existing:
                (self.dir / name).unlink()
        self.log_path = self.dir / "log.jsonl"
        self._log = self.log_path.open("a")

    def write_config(self, config: dict[str, Any]) -> None:
        _write_atomic(self.dir / "config.json", json.dumps(config, indent=2) + "\n")

    def log_generation(self, record: dict[str, Any]) -> None:
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()

    def write_result(self, result: dict[str, Any], best_z: np.ndarray) -> Path:
        np.save(self.dir / "best_z.npy", best_z)
        path = self.dir / "result.json"
        _write_atomic(path, json.dumps(result, indent=2) + "\n")
        return path

    def close(self) -> None:
        self._log.close()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
