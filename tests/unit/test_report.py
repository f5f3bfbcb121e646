"""What curve.png and compare.png show, checked on the data they are drawn from."""

from __future__ import annotations

import json

import pytest

from blackbox.report import (
    coinciding,
    comparison_panels,
    curve_panels,
    plot_comparison,
    plot_curve,
    running_min,
    z_size,
)

RESULT = {"task": "sst2", "seed": 13, "model": "smollm2-135m", "delta": "deep-prompt", "optimizer": "cma",
          "strategy": "divide-and-conquer", "dim": 20, "z_dim": 40, "popsize": 4, "budget": 16,
          "z_blocks": [{"name": "layer0", "size": 20}, {"name": "layer1", "size": 20}],
          "zero_shot_test_acc": 0.71, "test_acc": 0.79}


def records(losses, dev=(0.6, None, 0.7, 0.65)):
    best = float("-inf")
    rows = []
    for generation, (loss, acc) in enumerate(zip(losses, dev), start=1):
        best = max(best, acc) if acc is not None else best
        rows.append({"generation": generation, "api_calls": 4 * generation, "train_loss": loss,
                     "train_loss_mean": loss + 0.1, "dev_acc": acc, "best_dev_acc": best})
    return rows


def by_label(series_list):
    return {series.label.split(" (")[0]: series for series in series_list}


@pytest.mark.parametrize("blocks, z_dim, expected", [
    ([{"name": "z", "size": 500}], 500, "d=500"),
    ([{"name": "layer0", "size": 20}, {"name": "layer1", "size": 20}], 40, "d=40 (2 blocks of 20)"),
    ([{"name": "prompt", "size": 12}, {"name": "lora", "size": 8}], 20, "d=20 (prompt 12 + lora 8)"),
])
def test_z_size_is_the_servers_not_one_blocks(blocks, z_dim, expected):
    assert z_size({**RESULT, "z_blocks": blocks, "z_dim": z_dim}) == expected


def test_the_curve_shows_the_running_best_zero_shot_and_final_test():
    panels = curve_panels(records([0.7, 0.5, 0.6, 0.4]), RESULT)
    assert panels.title == "sst2 seed 13: smollm2-135m, deep-prompt, divide-and-conquer cma, d=40 (2 blocks of 20)"
    loss = by_label(panels.loss)
    assert loss["generation best"].y == [0.7, 0.5, 0.6, 0.4]
    assert loss["best so far"].y == [0.7, 0.5, 0.5, 0.4] and loss["best so far"].x == [4, 8, 12, 16]
    accuracy = by_label(panels.accuracy)
    assert accuracy["generation best on dev"].x == [4, 12, 16]  # generations without a dev check left out
    zero_shot = accuracy["zero-shot test"]
    assert zero_shot.kind == "level" and zero_shot.y == [0.71] and "0.7100" in zero_shot.label
    final = accuracy["final test, best-on-dev z"]
    assert final.kind == "mark" and (final.x, final.y) == ([16], [0.79]) and "0.7900" in final.label


def test_running_min():
    assert running_min([3.0, 1.0, 2.0, 0.5]) == [3.0, 1.0, 1.0, 0.5]
    assert running_min([]) == []


def test_coinciding_series_are_found_within_the_plots_resolution():
    x = [1, 2, 3]
    assert coinciding({"a": (x, [0.0, 0.5, 1.0]), "b": (x, [0.0, 0.5, 1.0 + 1e-6]), "c": (x, [0.0, 0.6, 1.0]),
                       "d": (x, [0.0, 0.5, 1.0])}) == {"b": "a", "d": "a"}
    assert coinciding({"a": (x, [0.5, 0.5, 0.5]), "b": ([1, 2, 4], [0.5, 0.5, 0.5])}) == {}
    assert coinciding({"a": (x, [0.5, 0.5, 0.5]), "b": (x, [0.5, 0.5, 0.5])}) == {"b": "a"}


def test_coinciding_optimizers_stay_visible_in_the_comparison():
    same = records([0.7, 0.5, 0.6, 0.4])
    runs = [({**RESULT, "optimizer": "cma"}, same), ({**RESULT, "optimizer": "sep-cma"}, same),
            ({**RESULT, "optimizer": "mezo", "popsize": 2}, records([0.8, 0.7, 0.6, 0.5], dev=(0.5,) * 4))]
    panels = comparison_panels(runs)
    assert "d=40 (2 blocks of 20)" in panels.title and "popsize 4 (mezo 2)" in panels.title
    for panel in (panels.loss, panels.accuracy):
        assert [s.label for s in panel] == ["cma", "sep-cma (coincides with cma)", "mezo"]
        assert [s.dashed for s in panel] == [False, True, False]
        assert len({s.marker for s in panel}) == 3 and len({s.marker_phase for s in panel}) == 3


def write_log(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_plots_are_written(tmp_path):
    log = write_log(tmp_path / "log.jsonl", records([0.7, 0.5, 0.6, 0.4]))
    curve = plot_curve(log, tmp_path / "curve.png", RESULT)
    results = [{**RESULT, "optimizer": name, "files": {"log": str(log)}} for name in ("cma", "sep-cma")]
    compare = plot_comparison(results, tmp_path / "compare.png")
    for png in (curve, compare):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
