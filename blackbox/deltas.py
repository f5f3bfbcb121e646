"""Tuned deltas used through the API: a run folder as a `SavedDelta` (what SaveDelta
stores, or Predict takes whole), and predicting a JSONL file of texts, resumably."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from blackbox.client import BackboneClient, KindInfo, SavedDelta
from blackbox.export import delta_spec_of_run
from blackbox.progress import Progress
from blackbox.runlog import RunLog

PREDICT_SLICE = 256  # texts per slice of a PredictStream: one API call each


def saved_delta_of_run(run_dir: str | Path, name: str, kinds: Mapping[str, KindInfo]) -> SavedDelta:
    """The best z of a finished `blackbox tune` run with what it takes to use it: the
    delta the run tuned (rebuilt from its config.json for the server's `kinds`), its
    template and verbalizer, and its label bias."""
    run_dir = Path(run_dir)
    config, z, result = RunLog.read_finished(run_dir)
    verbalizer = config.get("verbalizer") or _task_verbalizer(config)
    notes = {"task": str(config.get("task", "")), "seed": str(config.get("seed", "")), "run": str(run_dir.resolve())}
    if result.get("test_acc") is not None:
        notes["test_acc"] = f"{result['test_acc']:.4f}"
    return SavedDelta(name=name, delta=delta_spec_of_run(config, kinds), template=config["template"],
                      verbalizer=tuple(verbalizer), z=z.astype(np.float32), truncate=bool(config.get("truncate")),
                      label_bias=tuple(result.get("label_bias") or ()), notes=notes)


def _task_verbalizer(config: dict) -> tuple[str, ...]:
    """Runs made before config.json kept the verbalizer: their task's."""
    from blackbox.tasks import get_task, task_from_file

    task = task_from_file(config["task_file"]) if config.get("task_file") else get_task(config["task"])
    return tuple(task.verbalizer)


def read_texts(path: str | Path) -> list[tuple[str, str | None]]:
    """(text_a, text_b) of each line of a JSONL file ({"text_a": ..., "text_b": ...})."""
    from blackbox.tasks.data import jsonl_records

    texts = []
    for number, record in jsonl_records(Path(path)):
        if not isinstance(record.get("text_a"), str):
            raise ValueError(f'{path}:{number}: expected {{"text_a": "...", "text_b": "..."}}')
        text_b = record.get("text_b")
        if text_b is not None and not isinstance(text_b, str):
            raise ValueError(f"{path}:{number}: text_b must be a string")
        texts.append((record["text_a"], text_b))
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts


def predictions_done(out: Path, texts: list[tuple[str, str | None]]) -> int:
    """How many of `texts` a partial output file already answers (a torn last line is
    cut off), checking that they are the same texts."""
    if not out.exists():
        return 0
    kept, done = [], 0
    for line in out.read_text().splitlines(keepends=True):
        if not line.endswith("\n") or done >= len(texts):
            break  # the line a stopped predict was writing
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record.get("text_a") != texts[done][0]:
            raise ValueError(f"{out} holds predictions of other texts (line {done + 1}); choose another --out or "
                             "delete it")
        kept.append(line)
        done += 1
    out.write_text("".join(kept))
    return done


def predict_file(client: BackboneClient, texts: list[tuple[str, str | None]], out: str | Path,
                 name: str = "", delta: SavedDelta | None = None, progress: Progress | None = None) -> int:
    """Writes one line per text to `out` (its texts, `label`, `label_word`,
    `probabilities`), appending to what a stopped earlier call wrote; returns how many
    texts it predicted now."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = predictions_done(out, texts)
    progress = progress or Progress(bars=False)
    with progress.phase("predict", len(texts), "text", f"{len(texts)} texts, streamed {PREDICT_SLICE} per call",
                        done=done) as phase, out.open("a") as handle:
        slices = _slices(texts, done)  # streamed: the server scores one while the next goes out
        for batch, prediction in zip(slices, client.predict_stream(slices, name=name, delta=delta)):
            rows = prediction.probabilities if prediction.probabilities is not None else [None] * len(batch)
            for (text_a, text_b), label, row in zip(batch, prediction.labels, rows):
                record = {"text_a": text_a, **({"text_b": text_b} if text_b is not None else {}),
                          "label": int(label), "label_word": prediction.label_words[int(label)],
                          "probabilities": None if row is None else [round(float(p), 6) for p in row]}
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            phase.update(len(batch))
    return len(texts) - done


def _slices(texts: list, start: int) -> list[list]:
    return [texts[first:first + PREDICT_SLICE] for first in range(start, len(texts), PREDICT_SLICE)]
