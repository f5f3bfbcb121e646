"""`blackbox suite`: the table against hand-computed numbers, methods and their errors,
a tiny-model suite end to end that resumes after a kill, and Ray giving the same table
as the local pool."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blackbox.cli import main
from blackbox.suite import Method, SuiteError, aggregate, load_methods, markdown, mean_std, plan

TINY = ["--model", "tiny-llama", "--device", "cpu"]
FAST = "--budget 8 --popsize 4 --dim 6 --prompt-length 2 --placement after --no-zero-shot --test-limit 40"


def row(task, seed, method, test, zero, status="finished", prompt_length=2):
    return {"task": task, "seed": seed, "method": method, "status": status, "test_acc": test,
            "zero_shot_test_acc": zero, "prompt_length": prompt_length}


# ----------------------------------------------------------------------------- aggregation

def test_the_table_is_the_mean_and_spread_over_seeds_and_the_mean_over_tasks():
    rows = [row("sst2", 13, "bbt", 0.80, 0.60), row("sst2", 21, "bbt", 0.90, 0.60),
            row("rte", 13, "bbt", 0.50, 0.50), row("rte", 21, "bbt", 0.60, 0.50),
            row("sst2", 13, "lora", 0.70, 0.75, prompt_length=0), row("sst2", 21, "lora", 0.72, 0.75, prompt_length=0),
            row("rte", 13, "lora", 0.55, 0.52, prompt_length=0), row("rte", 21, "lora", 0.0, 0.0, "failed", 0)]
    tasks, table = aggregate(rows)
    assert tasks == ["sst2", "rte"]
    by_name = {entry["row"]: entry for entry in table}
    assert list(by_name) == ["z = 0 (bbt)", "manual prompt (z = 0 of lora)", "bbt", "lora"]
    bbt = by_name["bbt"]
    assert bbt["cells"]["sst2"][:2] == pytest.approx((0.85, math.sqrt(0.005)))
    assert bbt["cells"]["rte"][:2] == pytest.approx((0.55, math.sqrt(0.005)))
    assert bbt["average"] == pytest.approx(0.70)
    lora = by_name["lora"]
    assert lora["cells"]["rte"] == (0.55, 0.0, 1)  # the failed seed is left out, and counted
    assert lora["average"] == pytest.approx((0.71 + 0.55) / 2)
    text = markdown(tasks, table)
    assert "| bbt | 85.0 ± 7.1 | 55.0 ± 7.1 | 70.0 |" in text and "| lora | 71.0 ± 1.4 | 55.0 (1 of 2 seeds) | 63.0 |" in text


def test_a_task_with_no_finished_run_leaves_the_average_empty():
    tasks, table = aggregate([row("sst2", 13, "m", 0.8, 0.6), row("rte", 13, "m", 0, 0, "not run")])
    tuned = [entry for entry in table if entry["kind"] == "tuned"][0]
    assert tuned["cells"]["rte"] is None and tuned["average"] is None
    assert "| m | 80.0 | - | - |" in markdown(tasks, table)


def test_starting_points_shared_by_methods_appear_once():
    rows = [row("sst2", 13, "cma", 0.8, 0.6), row("sst2", 13, "mezo", 0.7, 0.6)]
    assert [entry["row"] for entry in aggregate(rows)[1]] == ["z = 0 (cma)", "cma", "mezo"]


def test_a_method_that_searched_nothing_is_its_starting_point_alone():
    rows = [{**row("sst2", 13, "manual", 0.76, 0.76, prompt_length=0), "api_calls": 0},
            {**row("sst2", 13, "cma", 0.8, 0.6), "api_calls": 40}]
    assert [entry["row"] for entry in aggregate(rows)[1]] == ["manual prompt (z = 0 of manual)", "z = 0 (cma)", "cma"]


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([4.0]) == (4.0, 0.0)


# -------------------------------------------------------------------------------- methods

def test_methods_from_the_command_line_and_from_files(tmp_path):
    assert Method.parse('bbt=--delta prompt --budget 8000') == Method("bbt", ("--delta", "prompt", "--budget", "8000"))
    (tmp_path / "m.json").write_text(json.dumps({"a": "--delta lora", "b": ["--optimizer", "mezo"]}))
    (tmp_path / "m.toml").write_text('a = "--delta lora"\nb = ["--optimizer", "mezo"]\n')
    for name in ("m.json", "m.toml"):
        assert load_methods(tmp_path / name) == [Method("a", ("--delta", "lora")), Method("b", ("--optimizer", "mezo"))]


@pytest.mark.parametrize("text, message", [
    ("no-equals-sign", "NAME="), ("bad name=--delta lora", "NAME="),
    ("x=--seed 21", "the suite sets those"), ("x=--out somewhere", "the suite sets those"),
])
def test_bad_methods_are_refused(text, message):
    with pytest.raises(SuiteError, match=message):
        Method.parse(text)


def test_duplicate_names_are_refused(tmp_path):
    with pytest.raises(SuiteError, match="distinct"):
        plan(["sst2"], [13], [Method("a", ()), Method("a", ())], tmp_path)


def test_a_suite_without_methods_is_one_error(tmp_path, capsys):
    assert main(["suite", "--tasks", "sst2", "--out", str(tmp_path)]) == 2
    assert "give at least one --method" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end

def suite_command(out: Path, *extra: str) -> list[str]:
    return ["suite", *TINY, "--tasks", "rte,sst2,mrpc", "--seeds", "13,21", "--method", f"cma={FAST}",
            "--method", f"lora={FAST} --delta lora", "--out", str(out), *extra]


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def kill_after_finished_runs(argv: list[str], out: Path, runs: int) -> dict[Path, int]:
    """Runs `blackbox ARGV` in a process of its own, SIGKILLs it once `runs` run folders
    under `out` hold a result, and returns those results' modification times."""
    script = f"from blackbox.cli import main; raise SystemExit(main({argv!r}))"
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(out.glob("runs/*/*/*/result.json"))) < runs and time.monotonic() < deadline:
        assert process.poll() is None, "the command ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/*/result.json")}


def test_a_suite_runs_every_run_once_and_resumes_after_a_kill(tmp_path):
    out = tmp_path / "suite"
    finished_before = kill_after_finished_runs(suite_command(out), out, runs=3)
    assert 3 <= len(finished_before) < 12

    assert main(suite_command(out)) == 0
    for path, mtime in finished_before.items():  # finished runs are skipped, not redone
        assert path.stat().st_mtime_ns == mtime
    results = read_csv(out / "results.csv")
    assert len(results) == 12 and {r["status"] for r in results} == {"finished"}
    assert {(r["task"], r["seed"], r["method"]) for r in results} == {
        (t, s, m) for t in ("rte", "sst2", "mrpc") for s in ("13", "21") for m in ("cma", "lora")}
    assert all(r["api_calls"] == "8" for r in results)
    table = (out / "table.md").read_text()
    assert "| cma |" in table and "| lora |" in table and "± " in table
    assert (out / "table.png").stat().st_size > 1000
    header = next(csv.reader((out / "table.csv").open()))
    assert header[:4] == ["row", "kind", "rte_mean", "rte_std"] and header[-1] == "average"

    # Everything finished: a third invocation runs nothing and writes the same table.
    assert main(suite_command(out)) == 0
    assert (out / "table.md").read_text() == table


def test_ray_gives_the_table_of_the_local_pool(tmp_path):
    pytest.importorskip("ray")
    command = ["suite", *TINY, "--tasks", "rte,sst2", "--seeds", "13", "--method", f"cma={FAST}"]
    assert main(command + ["--out", str(tmp_path / "local")]) == 0
    assert main(command + ["--ray", "local", "--out", str(tmp_path / "ray")]) == 0
    local, on_ray = (read_csv(tmp_path / name / "table.csv") for name in ("local", "ray"))
    assert local == on_ray
    assert [r["test_acc"] for r in read_csv(tmp_path / "local" / "results.csv")] == [
        r["test_acc"] for r in read_csv(tmp_path / "ray" / "results.csv")]


def test_two_local_workers_give_the_table_of_one(tmp_path):
    command = ["suite", *TINY, "--tasks", "rte,sst2", "--seeds", "13", "--method", f"cma={FAST}"]
    assert main(command + ["--out", str(tmp_path / "one")]) == 0
    assert main(command + ["--workers", "2", "--out", str(tmp_path / "two")]) == 0
    assert read_csv(tmp_path / "one" / "table.csv") == read_csv(tmp_path / "two" / "table.csv")


def test_table_only_runs_nothing_and_counts_the_seeds_there(tmp_path, capsys):
    out = tmp_path / "suite"
    command = ["suite", *TINY, "--tasks", "rte", "--method", f"cma={FAST}", "--out", str(out)]
    assert main(command + ["--seeds", "13"]) == 0
    capsys.readouterr()
    assert main(command + ["--seeds", "13,21", "--table-only"]) == 0
    captured = capsys.readouterr()
    assert "1 of 2 runs have no result yet" in captured.err and "starting an embedded" not in captured.err
    assert not (out / "runs" / "rte" / "cma" / "seed-21").exists()
    statuses = {r["seed"]: r["status"] for r in read_csv(out / "results.csv")}
    assert statuses == {"13": "finished", "21": "not run"}
    assert "| cma | " in (out / "table.md").read_text() and " (1 of 2 seeds) |" in (out / "table.md").read_text()


def test_a_failing_run_is_recorded_and_the_rest_go_on(tmp_path, capsys):
    out = tmp_path / "suite"
    command = ["suite", *TINY, "--tasks", "rte", "--seeds", "13", "--method", f"ok={FAST}",
               "--method", f"bad={FAST} --delta nope", "--out", str(out)]
    assert main(command) == 2
    assert "1 of 2 runs did not finish" in capsys.readouterr().err
    results = {r["method"]: r for r in read_csv(out / "results.csv")}
    assert results["ok"]["status"] == "finished"
    assert results["bad"]["status"] == "failed" and "nope" in results["bad"]["error"]


def test_anchors_print_the_published_rows_with_their_sources(tmp_path, capsys):
    command = ["suite", *TINY, "--tasks", "rte,sst2", "--seeds", "13", "--method", f"cma={FAST}", "--anchors",
               "--out", str(tmp_path / "suite")]
    assert main(command) == 0
    table = (tmp_path / "suite" / "table.md").read_text()
    assert "Published results on RoBERTa-large, not on this backbone" in table
    bbt = next(line for line in table.splitlines() if line.startswith("| BBT |"))
    cells = [cell.strip() for cell in bbt.strip("|").split("|")]
    assert cells[1:3] == ["52.6", "89.6"]  # RTE and SST-2 in the BBT paper's main table
    assert "[1] " in table and "2201.03514" in table
    assert main(command[:-3] + ["--anchors", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")]) == 2
    assert "no published results file" in capsys.readouterr().err


def test_a_task_file_runs_beside_a_built_in_task(tmp_path):
    lines = {split: [json.dumps({"text": f"{word} {split} example {i}", "label": word})
                     for i in range(count) for word in ("good", "bad")]
             for split, count in (("train", 4), ("dev", 4), ("test", 5))}
    for split, rows in lines.items():
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    task_file = tmp_path / "mine.json"
    task_file.write_text(json.dumps({
        "name": "mine", "format": "jsonl", "columns": {"text_a": "text", "label": "label"},
        "train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl", "labels": ["bad", "good"],
        "verbalizer": ["bad", "good"], "template": "{text_a} It was{prompt} {mask} ."}))
    out = tmp_path / "suite"
    # The template puts {prompt} right before {mask}: a soft prompt is read there, a prefix cannot be.
    assert main(["suite", *TINY, "--tasks", f"rte,{task_file}", "--seeds", "13",
                 "--method", f"cma={FAST} --delta prompt", "--out", str(out)]) == 0
    results = read_csv(out / "results.csv")
    assert [r["task"] for r in results] == ["rte", "mine"] and {r["status"] for r in results} == {"finished"}
    assert (out / "runs" / "mine" / "cma" / "seed-13" / "result.json").exists()
    assert (out / "table.md").read_text().splitlines()[0] == "| method | rte | mine | average |"
