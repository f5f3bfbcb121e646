"""A run's files: config.json, log.jsonl (one line per generation), checkpoint.pkl (the
state after the last finished generation), result.json, best_z.npy, curve.png."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RUN_FILES = ("config.json", "log.jsonl", "checkpoint.pkl", "result.json", "best_z.npy", "curve.png")
CHECKPOINT = "checkpoint.pkl"
CHECKPOINT_FORMAT = 1
# What a rerun in the same folder would lose: a folder holding neither (a run stopped before
# its first generation was checkpointed) is started again without --overwrite.
VALUABLE = (CHECKPOINT, "result.json")


class RunDirError(ValueError):
    pass


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Readers never see half a file, even if the run is killed mid-write."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(staging, path)


@dataclass
class StoredRun:
    """What `--resume` continues: the settings (TuneConfig as a dict, maybe with config.json's
    extra keys) and model of the run in a folder, and its checkpoint; None: the run stopped
    before its first generation was checkpointed, and starts again from the beginning."""

    config: dict[str, Any]
    model: str
    checkpoint: dict[str, Any] | None

    @property
    def api_calls(self) -> int:
        return self.checkpoint["api_calls"] if self.checkpoint is not None else 0


class RunLog:
    """Opens a run folder: a new run (refusing to clobber a checkpoint or a result unless
    `overwrite`; a run stopped before its first checkpoint has neither, and is replaced),
    or, given the `resume_from` checkpoint read from it, the run stored there."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False,
                 resume_from: dict[str, Any] | None = None):
        self.dir = Path(out)
        self.log_path = self.dir / "log.jsonl"
        if resume_from is not None:
            # Lines logged after the checkpoint (a kill between the two writes) are
            # written again by the resumed run.
            kept = [r for r in read_log(self.log_path) if r["generation"] <= resume_from["generation"]]
            _write_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))
            for name in ("result.json", "best_z.npy", "curve.png"):
                (self.dir / name).unlink(missing_ok=True)
        else:
            existing = [name for name in RUN_FILES if (self.dir / name).exists()]
            if not overwrite and any(name in VALUABLE for name in existing):
                raise RunDirError(
                    f"{self.dir} already holds a run ({', '.join(existing)}); "
                    "choose another --out, continue it with --resume, or pass --overwrite"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
            for name in existing:
                (self.dir / name).unlink()
        # The files of an unfinished run replaced without --overwrite, for the caller to say.
        self.replaced = [] if resume_from is not None or overwrite else existing
        self._log = self.log_path.open("a")

    @staticmethod
    def read_checkpoint(out: str | os.PathLike) -> dict[str, Any]:
        path = Path(out) / CHECKPOINT
        if not path.exists():
            raise RunDirError(f"nothing to resume: {path} does not exist")
        try:
            checkpoint = pickle.loads(path.read_bytes())
        except Exception as error:
            raise RunDirError(f"{path} is not a readable checkpoint: {error}") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise RunDirError(f"{path} was written by another version of blackbox")
        return checkpoint

    @staticmethod
    def read_finished(run_dir: str | os.PathLike) -> tuple[dict, np.ndarray, dict]:
        """(config.json, best_z.npy, result.json or {}) of a finished run folder; RunDirError
        naming the file that is missing."""
        run_dir = Path(run_dir)
        try:
            config = json.loads((run_dir / "config.json").read_text())
            z = np.load(run_dir / "best_z.npy")
        except FileNotFoundError as error:
            raise RunDirError(f"{run_dir} holds no finished run ({Path(error.filename).name} is missing)") from None
        result_file = run_dir / "result.json"
        return config, z, json.loads(result_file.read_text()) if result_file.exists() else {}

    @staticmethod
    def read_stored(out: str | os.PathLike) -> StoredRun:
        """The run `--resume` continues in `out`: from its checkpoint, or, where the run
        stopped before its first generation was checkpointed (config.json, no checkpoint,
        no result), from the beginning with config.json's settings. RunDirError where
        there is nothing to resume."""
        out = Path(out)
        if (out / CHECKPOINT).exists():
            checkpoint = RunLog.read_checkpoint(out)
            return StoredRun(checkpoint["config"], checkpoint["model"], checkpoint)
        config_path = out / "config.json"
        if not config_path.exists() or (out / "result.json").exists():
            # A result without a checkpoint: a run that searched nothing (--budget 0), finished.
            raise RunDirError(f"nothing to resume: {out / CHECKPOINT} does not exist")
        try:
            config = json.loads(config_path.read_text())
            model = config["model"]
        except (ValueError, KeyError, TypeError) as error:
            raise RunDirError(f"nothing to resume: {out} has no checkpoint, and its config.json is not a "
                              f"run's ({error!r})") from None
        return StoredRun(config, model, None)

    def write_checkpoint(self, state: dict[str, Any]) -> None:
        """Only load checkpoints you wrote: they are pickles."""
        payload = {"format": CHECKPOINT_FORMAT, **state}
        _write_atomic(self.dir / CHECKPOINT, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))

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
