"""Several optimizers on the same task, delta and budget: one run each, then a table
(compare.csv, compare.md) and a plot (compare.png)."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path
from typing import Any

from blackbox.client import BackboneClient
from blackbox.report import plot_comparison
from blackbox.tune_config import TuneConfig, build_optimizer
from blackbox.tuner import run_tune

COLUMNS = ("optimizer", "best_dev_acc", "test_acc", "zero_shot_test_acc", "api_calls", "generations",
           "best_generation", "stop_reason", "wall_s")


def run_folder_name(optimizer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", optimizer)


def compare(base: TuneConfig, optimizers: list[str], client: BackboneClient, show_progress: bool = True,
            overwrite: bool = False) -> list[dict[str, Any]]:
    """Runs `base` once per optimizer under base.out/<optimizer>/ and writes the summary."""
    if not optimizers or len(set(optimizers)) != len(optimizers):
        raise ValueError(f"give distinct optimizers, got {optimizers}")
    for name in optimizers:  # every name is checked before any run spends its budget
        build_optimizer(dataclasses.replace(base, optimizer=name))
    out = Path(base.out)
    summary = out / "compare.csv"
    if summary.exists() and not overwrite:
        raise ValueError(f"{out} already holds a comparison; choose another --out or pass --overwrite")
    results, zero_shots = [], {}
    for name in optimizers:
        config = dataclasses.replace(base, optimizer=name, out=str(out / run_folder_name(name)))
        # The same starting point for every optimizer, scored once (once each way where a
        # gradient run cannot be calibrated and the others are).
        result = run_tune(config, client, show_progress=show_progress, overwrite=overwrite,
                          zero_shot=zero_shots.get(config.calibrated))
        zero_shots[config.calibrated] = result["zero_shot"]
        results.append(result)

    rows = [{column: result[column] for column in COLUMNS} for result in results]
    with summary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "compare.md").write_text(markdown_table(rows))
    plot_comparison(results, out / "compare.png")
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) and not isinstance(value, bool) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"
