"""`blackbox intrinsic-dim` on a tiny model: the three files, resume after a kill, the
gradient reference on the whole delta, the budget per d, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blackbox.cli import main
from tests.integration.test_suite import kill_after_finished_runs, read_csv

TINY = ["--model", "tiny-llama", "--device", "cpu"]
FAST = ["--delta", "prompt", "--budget", "8", "--popsize", "4", "--prompt-length", "2", "--placement", "after", "--no-zero-shot",
        "--test-limit", "40"]


def sweep_command(out: Path, *extra: str) -> list[str]:
    return ["intrinsic-dim", *TINY, "--task", "sst2", "--dims", "4,8,16", "--seeds", "13,21", "--reference", "0.8",
            "--out", str(out), *FAST, *extra]


def test_a_sweep_writes_the_three_files_and_resumes_after_a_kill(tmp_path):
    out = tmp_path / "sweep"
    finished_before = kill_after_finished_runs(sweep_command(out), out, runs=2)
    assert 2 <= len(finished_before) < 6

    assert main(sweep_command(out)) == 0
    for path, mtime in finished_before.items():
        assert path.stat().st_mtime_ns == mtime
    rows = read_csv(out / "sweep.csv")
    assert {(r["d"], r["seed"]) for r in rows} == {(d, s) for d in ("4", "8", "16") for s in ("13", "21")}
    assert {r["status"] for r in rows} == {"finished"} and {r["api_calls"] for r in rows} == {"8"}
    assert all(r["d"] == r["projection_dim"] for r in rows)  # no SAID scales: d is --dim
    # D: the soft prompt's 2 vectors of the tiny model's hidden size, as the server says.
    assert {r["D"] for r in rows} == {str(2 * 64)}
    summary = json.loads((out / "d90.json").read_text())
    assert {"d90", "interval", "reference", "reference_source"} <= set(summary)
    assert summary["reference"] == 0.8 and "given" in summary["reference_source"]
    assert [point["d"] for point in summary["curve"]] == [4, 8, 16]
    by_d = {}
    for r in rows:
        by_d.setdefault(int(r["d"]), []).append(float(r["test_acc"]))
    for point in summary["curve"]:
        assert point["mean_test_acc"] == pytest.approx(sum(by_d[point["d"]]) / 2)
    best = max(point["mean_test_acc"] for point in summary["curve"])
    assert summary["d90_of_the_sweeps_best"]["reference"] == pytest.approx(best)  # beside the one asked for
    if summary["d90"] is None:  # a random tiny model rarely reaches 72%: then it says so
        assert summary["interval"][1] is None and "not reached" in summary["note"]
    assert (out / "accuracy_vs_d.png").stat().st_size > 1000


def test_the_gradient_reference_tunes_the_whole_delta_and_the_budget_grows_with_d(tmp_path, capsys):
    out = tmp_path / "sweep"
    command = ["intrinsic-dim", *TINY, "--task", "sst2", "--dims", "2:8:x2", "--seeds", "13", "--reference",
               "gradient", "--reference-budget", "3", "--budget-per-dim", "2", "--out", str(out),
               *[option for option in FAST if option not in ("--budget", "8")]]
    assert main(command) == 0
    rows = read_csv(out / "sweep.csv")
    sweep = {int(r["d"]): r for r in rows if r["run"] == "sweep"}
    assert sorted(sweep) == [2, 4, 8]
    assert [int(sweep[d]["budget"]) for d in (2, 4, 8)] == [4, 8, 16]  # 2 x d, at least one generation of 4
    (reference,) = [r for r in rows if r["run"] == "reference"]
    assert reference["projection"] == "identity" and reference["optimizer"] == "gradient"
    assert int(reference["d"]) == int(reference["D"]) == 2 * 64
    summary = json.loads((out / "d90.json").read_text())
    assert summary["reference"] == pytest.approx(float(reference["test_acc"]))
    assert "gradient" in summary["reference_source"]
    assert [point["budget"] for point in summary["curve"]] == [4, 8, 16]
    assert "d90 = " in capsys.readouterr().out


def test_the_best_reference_is_the_curves_own_plateau_and_says_so(tmp_path):
    out = tmp_path / "sweep"
    assert main(["intrinsic-dim", *TINY, "--task", "sst2", "--dims", "2,4", "--seeds", "13", "--reference", "best",
                 "--out", str(out), *FAST]) == 0
    summary = json.loads((out / "d90.json").read_text())
    assert summary["reference"] == max(point["mean_test_acc"] for point in summary["curve"])
    assert "own best" in summary["reference_source"]
    assert summary["d90"] is not None  # the best d reaches 90% of itself


@pytest.mark.parametrize("extra, message", [
    (["--dims", "8:4:x2"], "--dims"),
    (["--dims", "4", "--reference", "80"], "(0, 1]"),
    (["--dims", "4", "--reference", "sometimes"], "--reference takes"),
    (["--dims", "4", "--dim", "5"], "the sweep sets d"),
    (["--dims", "4", "--seed", "5"], "the suite sets those"),
    (["--dims", "4", "--budget-per-dim", "3", "--budget", "8"], "exclude each other"),
    (["--dims", "4", "--optimizer", "nonsense"], "nonsense"),
])
def test_bad_inputs_are_one_error_before_any_model_loads(tmp_path, capsys, extra, message):
    command = ["intrinsic-dim", "--model", "/nonexistent/model", "--task", "sst2", "--out", str(tmp_path), *extra]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert message in err and "starting an embedded" not in err
    assert not (tmp_path / "runs").exists()


def test_an_option_no_command_takes_is_still_refused(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_ray_gives_the_sweep_of_the_local_pool(tmp_path):
    pytest.importorskip("ray")
    command = ["intrinsic-dim", *TINY, "--task", "rte", "--dims", "2,4", "--seeds", "13", "--reference", "0.6", *FAST]
    assert main(command + ["--out", str(tmp_path / "local")]) == 0
    assert main(command + ["--ray", "local", "--out", str(tmp_path / "ray")]) == 0
    local, on_ray = (read_csv(tmp_path / name / "sweep.csv") for name in ("local", "ray"))
    assert [(r["d"], r["test_acc"], r["api_calls"]) for r in local] == [
        (r["d"], r["test_acc"], r["api_calls"]) for r in on_ray]
    assert json.loads((tmp_path / "local" / "d90.json").read_text())["curve"] == json.loads(
        (tmp_path / "ray" / "d90.json").read_text())["curve"]


def test_a_said_sweep_counts_the_per_layer_scales_in_d(tmp_path):
    out = tmp_path / "said"
    assert main(["intrinsic-dim", *TINY, "--task", "sst2", "--dims", "2,4", "--seeds", "13", "--reference", "0.8",
                 "--said", "--out", str(out), *FAST]) == 0
    rows = read_csv(out / "sweep.csv")
    # The soft prompt is one group: one scale on top of --dim (SAID's d counts it).
    assert [(r["projection_dim"], r["d"]) for r in rows] == [("2", "3"), ("4", "5")]
    curve = json.loads((out / "d90.json").read_text())["curve"]
    assert [(point["d"], point["budget"]) for point in curve] == [(3, 8), (5, 8)]
