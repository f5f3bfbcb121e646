"""Plots of runs (train loss and accuracy against API calls) and of a suite's table.

What a plot shows is built first as data (`Panels`: `curve_panels` for one run's
curve.png, `comparison_panels` for compare.png) and then drawn (`draw`), so that the
tests check what a reader will see without reading pixels back.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from blackbox.runlog import read_log

# Shapes that tell lines apart where they overlap; a run's line keeps its shape on both panels.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Series closer than this share of their panel's range look like one line.
COINCIDE_TOLERANCE = 1e-3


@dataclass
class Series:
    """One thing drawn on a panel: a `line`, a `step` line, `points`, a `level` (a
    horizontal line at y[0], across the panel) or a `mark` (one highlighted point)."""

    label: str
    x: list[float]
    y: list[float]
    kind: str = "line"
    marker: str | None = None
    marker_phase: float = 0.0  # where along the marker spacing its first marker sits (0 to 1)
    dashed: bool = False


@dataclass
class Panels:
    """A figure: its title and the series of the loss panel and of the accuracy panel."""

    title: str
    loss: list[Series] = field(default_factory=list)
    accuracy: list[Series] = field(default_factory=list)
    loss_label: str = "train loss"
    accuracy_label: str = "accuracy"


def z_size(result: dict[str, Any]) -> str:
    """z's real size: the server's `z_dim` and its blocks (divide and conquer over layers
    or parts), not the `--dim` asked for, which is one block's."""
    blocks = result.get("z_blocks") or []
    d = f"d={result.get('z_dim', result.get('dim'))}"
    if len(blocks) <= 1:
        return d
    sizes = {block["size"] for block in blocks}
    if len(sizes) == 1:
        return f"{d} ({len(blocks)} blocks of {sizes.pop()})"
    parts = " + ".join(f"{block['name']} {block['size']}" for block in blocks)
    return f"{d} ({parts})"


def run_title(result: dict[str, Any]) -> str:
    return (f"{result['task']} seed {result['seed']}: {result['model']}, {result['delta']}, "
            f"{result['strategy']} {result['optimizer']}, {z_size(result)}")


def running_min(values: list[float]) -> list[float]:
    return list(itertools.accumulate(values, min))


def curve_panels(records: list[dict[str, Any]], result: dict[str, Any]) -> Panels:
    """One run (log.jsonl `records`, result.json's `result`): the population's mean and
    best train loss per generation and the best so far; the dev checks, the best dev
    accuracy so far, the zero-shot test accuracy (z = 0) and the final test accuracy of
    the z chosen on dev, so that a reader sees what tuning gained."""
    calls = [r["api_calls"] for r in records]
    best = [r["train_loss"] for r in records]
    checked = [r for r in records if r.get("dev_acc") is not None]
    dev_calls = [r["api_calls"] for r in checked]
    panels = Panels(run_title(result), loss=[
        Series("population mean", calls, [r["train_loss_mean"] for r in records]),
        Series("generation best", calls, best),
        Series("best so far", calls, running_min(best), kind="step"),
    ], accuracy=[
        Series("generation best on dev", dev_calls, [r["dev_acc"] for r in checked], kind="points"),
        Series("best dev so far", dev_calls, [r["best_dev_acc"] for r in checked], kind="step"),
    ])
    if result.get("zero_shot_test_acc") is not None:
        panels.accuracy.append(Series(f"zero-shot test ({result['zero_shot_test_acc']:.4f})", [],
                                      [result["zero_shot_test_acc"]], kind="level", dashed=True))
    if result.get("test_acc") is not None:
        panels.accuracy.append(Series(f"final test, best-on-dev z ({result['test_acc']:.4f})",
                                      [calls[-1] if calls else 0], [result["test_acc"]], kind="mark"))
    return panels


def coinciding(series: dict[str, tuple[list[float], list[float]]]) -> dict[str, str]:
    """Each series that lies on an earlier one (same x, y within COINCIDE_TOLERANCE of
    the values' range), mapped to the first such earlier series."""
    values = [y for _, ys in series.values() for y in ys]
    tolerance = COINCIDE_TOLERANCE * ((max(values) - min(values)) if values else 0.0) or 1e-12
    found: dict[str, str] = {}
    names = list(series)
    for i, name in enumerate(names):
        x, y = series[name]
        for earlier in names[:i]:
            ex, ey = series[earlier]
            if x == ex and len(y) == len(ey) and all(abs(a - b) <= tolerance for a, b in zip(y, ey)):
                found[name] = found.get(earlier, earlier)
                break
    return found


def comparison_title(results: list[dict[str, Any]]) -> str:
    """The shared setting; an optimizer whose population differs (the white-box gradient
    takes one step per generation) is named with its own."""
    first = results[0]
    popsizes = [result["popsize"] for result in results]
    common = max(popsizes, key=popsizes.count)
    others = ", ".join(f"{r['optimizer']} {r['popsize']}" for r in results if r["popsize"] != common)
    return (f"{first['task']} seed {first['seed']}: {first['model']}, {first['delta']}, {first['strategy']}, "
            f"{z_size(first)}, popsize {common}{f' ({others})' if others else ''}, budget {first['budget']}")


def comparison_panels(runs: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> Panels:
    """Several runs of one setting (result.json's result and log.jsonl's records, one per
    optimizer): each run's best train loss per generation and best dev accuracy so far,
    in its own marker shape. A line that lies on another's (two optimizers that made the
    same steps) is drawn dashed over it and says so in the legend, or it would vanish."""
    panels = Panels(comparison_title([result for result, _ in runs]),
                    loss_label="train loss (generation best)", accuracy_label="best dev accuracy so far")
    for panel, key, kind in ((panels.loss, "train_loss", "line"), (panels.accuracy, "best_dev_acc", "step")):
        series = {result["optimizer"]: ([r["api_calls"] for r in records], [r[key] for r in records])
                  for result, records in runs}
        on = coinciding(series)
        for i, ((name, (x, y)), marker) in enumerate(zip(series.items(), itertools.cycle(MARKERS))):
            label = f"{name} (coincides with {on[name]})" if name in on else name
            # Staggered markers: lines that lie on each other still show every shape.
            panel.append(Series(label, x, y, kind=kind, marker=marker, marker_phase=i / len(series),
                                dashed=name in on))
    return panels


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def draw(panels: Panels, out_png: str | os.PathLike) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, series_list, label in zip(axes, (panels.loss, panels.accuracy),
                                        (panels.loss_label, panels.accuracy_label)):
        for series in series_list:
            _draw_series(axis, series)
        axis.set_xlabel("API calls")
        axis.set_ylabel(label)
        axis.legend(fontsize="small")
    figure.suptitle(panels.title)
    figure.tight_layout()
    out = Path(out_png)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def _draw_series(axis, series: Series) -> None:
    style = {"label": series.label, "linestyle": "--" if series.dashed else "-"}
    if series.marker:
        # A marker on every point hides the line on long runs; about a dozen along it suffice.
        every = max(1, len(series.x) // 12)
        style.update(marker=series.marker, markevery=(int(series.marker_phase * every), every),
                     markerfacecolor="none")
    if series.kind == "line":
        axis.plot(series.x, series.y, **style)
    elif series.kind == "step":
        axis.step(series.x, series.y, where="post", **style)
    elif series.kind == "points":
        axis.plot(series.x, series.y, ".", alpha=0.5, label=series.label)
    elif series.kind == "level":
        axis.axhline(series.y[0], color="grey", linewidth=1, **style)
    elif series.kind == "mark":
        axis.plot(series.x, series.y, "*", markersize=14, color="crimson", label=series.label)
        axis.annotate(f"{series.y[0]:.4f}", (series.x[0], series.y[0]), textcoords="offset points",
                      xytext=(-8, 8), ha="right", color="crimson")
    else:
        raise ValueError(f"unknown series kind {series.kind!r}")


def plot_curve(log_path: str | os.PathLike, out_png: str | os.PathLike, result: dict[str, Any]) -> Path:
    """curve.png of one run: its log.jsonl and its result.json's `result` (see `curve_panels`)."""
    return draw(curve_panels(read_log(log_path), result), out_png)


def plot_comparison(results: list[dict[str, Any]], out_png: str | os.PathLike) -> Path:
    """compare.png of several runs' results (each with its log at result["files"]["log"])."""
    return draw(comparison_panels([(result, read_log(result["files"]["log"])) for result in results]), out_png)


def plot_table(tasks: Sequence[str], table: Sequence[dict[str, Any]], path: Path) -> None:
    """table.png of a suite (`blackbox.suite.aggregate`'s table): per task and for the
    average, one bar per row, the spread over seeds as error bars, z = 0 rows hatched."""
    plt = pyplot()
    groups = [*tasks, "average"]
    width = 0.8 / max(1, len(table))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(table)) ** 0.5), 4.2))
    for index, row in enumerate(table):
        means = [100 * row["cells"][t][0] if row["cells"][t] else math.nan for t in tasks]
        spreads = [100 * row["cells"][t][1] if row["cells"][t] else 0.0 for t in tasks]
        means.append(100 * row["average"] if row["average"] is not None else math.nan)
        spreads.append(0.0)
        offsets = [g + (index - (len(table) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(offsets, means, width, yerr=spreads, capsize=2, label=row["row"],
                 hatch="//" if row["kind"] == "zero-shot" else None, alpha=0.85)
    axis.set_xticks(range(len(groups)), groups)
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("mean ± std over seeds")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
