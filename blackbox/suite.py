"""Tasks x seeds x methods: one `blackbox tune` run each, then the field's table.

A method is a named set of `tune` options ("bbt" = "--delta prompt --budget 8000"). Every
(task, seed, method) gets its own run folder, `DIR/runs/TASK/METHOD/seed-SEED`, and is run
by the same code path as `blackbox tune` (its argv is built here and parsed there), so a
suite run and a hand-typed run are the same run. A folder holding result.json is
finished and skipped; one holding a checkpoint is resumed; so a killed suite picks up
where it stopped. Runs go through a local pool of worker processes, or as Ray tasks.

What the suite writes:
- `results.csv`: one row per run (task, seed, method, status, accuracies, calls, time).
- `table.csv`, `table.md`: per task, mean and standard deviation over seeds of the test
  accuracy, and the average over tasks of those means; one row per method, and one row
  per distinct starting point (z = 0) the methods had. For a weight kind (lora, adapter,
  bias) z = 0 is the template alone, the papers' manual prompt, and the row says so.
- `table.png`: the same numbers as grouped bars with the spread as error bars.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

from blackbox.report import plot_table

RESULT_COLUMNS = ("task", "seed", "method", "status", "test_acc", "zero_shot_test_acc", "best_dev_acc",
                  "api_calls", "budget", "generations", "wall_s", "delta", "prompt_length", "optimizer", "run_dir",
                  "error")

# Options a method may not set: the suite decides them for every run.
_SUITE_OWNS = ("--task", "--task-file", "--seed", "--out", "--resume", "--overwrite")


class SuiteError(ValueError):
    pass


@dataclass(frozen=True)
class Method:
    name: str
    options: tuple[str, ...]  # `blackbox tune` arguments

    @classmethod
    def parse(cls, text: str) -> Method:
        """NAME="TUNE OPTIONS", as `--method` takes it."""
        name, sep, options = text.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise SuiteError(f"--method takes NAME=\"TUNE OPTIONS\" with a NAME of letters, digits, '_.+-', got {text!r}")
        return cls.of(name, shlex.split(options))

    @classmethod
    def of(cls, name: str, options: Sequence[str] | str) -> Method:
        options = tuple(shlex.split(options) if isinstance(options, str) else options)
        owned = [option for option in options if option.split("=")[0] in _SUITE_OWNS]
        if owned:
            raise SuiteError(f"method {name!r} sets {', '.join(owned)}: the suite sets those for every run "
                             "(use --tasks, --seeds and --out)")
        return cls(name, options)


def load_methods(path: str | Path) -> list[Method]:
    """Methods from a JSON or TOML file: {NAME: "TUNE OPTIONS" or [ARG, ...], ...}."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SuiteError(f"cannot read the methods file {path}: {error.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            table = tomllib.loads(text)
        else:
            table = json.loads(text)
    except ValueError as error:
        raise SuiteError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {error}") from None
    if not isinstance(table, dict) or not table:
        raise SuiteError(f"{path}: expected a table of NAME = \"TUNE OPTIONS\"")
    methods = []
    for name, options in table.items():
        if not isinstance(options, (str, list)) or (isinstance(options, list)
                                                    and not all(isinstance(o, str) for o in options)):
            raise SuiteError(f"{path}: method {name!r} must be a string of options or a list of them")
        methods.append(Method.of(str(name), options))
    return methods


@dataclass(frozen=True)
class SuiteTask:
    """A built-in task name or the path of a task file, with the task's name (read once)."""

    spec: str
    name: str
    from_file: bool

    @classmethod
    def of(cls, spec: str) -> SuiteTask:
        if not (spec.endswith(".json") or "/" in spec):
            return cls(spec, spec, from_file=False)
        from blackbox.tasks import TaskError, task_from_file

        path = Path(spec).resolve()
        try:
            name = task_from_file(path).name
        except TaskError:  # its runs fail with the file's own error, and say so in results.csv
            name = path.stem
        return cls(str(path), name, from_file=True)

    def arguments(self) -> list[str]:
        return ["--task-file", self.spec] if self.from_file else ["--task", self.spec]


@dataclass(frozen=True)
class PlannedRun:
    task: SuiteTask
    seed: int
    method: Method
    folder: Path

    def argv(self, backbone: Sequence[str], action: str) -> list[str]:
        """`blackbox tune` arguments; `action` is "new", "resume" or "restart"."""
        extra = {"new": [], "resume": ["--resume"], "restart": ["--overwrite"]}[action]
        if action == "resume":  # the run's own settings; only the limits may be given again
            return ["tune", *backbone, "--out", str(self.folder), "--quiet", *extra]
        return ["tune", *self.task.arguments(), "--seed", str(self.seed), *self.method.options, *backbone,
                "--out", str(self.folder), "--quiet", *extra]


def plan(tasks: Sequence[str], seeds: Sequence[int], methods: Sequence[Method], out: str | Path) -> list[PlannedRun]:
    if not tasks or not seeds or not methods:
        raise SuiteError("a suite needs at least one task, one seed and one method")
    names = [method.name for method in methods]
    if len(set(names)) != len(names):
        raise SuiteError(f"method names must be distinct, got {names}")
    suite_tasks = [SuiteTask.of(spec) for spec in tasks]
    task_names = [task.name for task in suite_tasks]
    if len(set(task_names)) != len(task_names):
        raise SuiteError(f"task names must be distinct, got {task_names}")
    runs = Path(out) / "runs"
    return [PlannedRun(task, seed, method, runs / _folder_name(task.name) / _folder_name(method.name) / f"seed-{seed}")
            for task in suite_tasks for method in methods for seed in seeds]


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name)


def next_action(run: PlannedRun) -> str | None:
    """What a run folder needs: None (finished), "resume", "restart" (a run that left no
    checkpoint, killed before its first generation) or "new"."""
    if (run.folder / "result.json").exists():
        return None
    if (run.folder / "checkpoint.pkl").exists():
        return "resume"
    if run.folder.exists() and any(run.folder.iterdir()):
        return "restart"
    return "new"


# Runs `blackbox tune` with an argv: {"code": exit code, "error": its error line}. The
# command line hands its own in (`blackbox.cli.run_tune_argv`); a module-level function,
# so that worker processes and Ray can pickle it.
Runner = Callable[[list[str]], dict[str, Any]]


def execute(runs: Sequence[PlannedRun], backbone: Sequence[str], runner: Runner, workers: int = 1,
            ray_address: str | None = None, say: Callable[[str], None] = print) -> dict[Path, dict[str, Any]]:
    """Runs what each run folder needs with `runner`, `workers` at a time or on Ray;
    returns each run's outcome (code, error) by folder; finished runs are skipped."""
    todo = []
    for run in runs:
        action = next_action(run)
        if action is None:
            say(f"{_label(run)}: finished already, skipped")
        else:
            todo.append((run, action))
    outcomes: dict[Path, dict[str, Any]] = {}
    if not todo:
        return outcomes
    say(f"{len(todo)} of {len(runs)} runs to do" + (f" on Ray ({ray_address})" if ray_address
                                                   else f", {workers} at a time"))
    argvs = [run.argv(backbone, action) for run, action in todo]
    if ray_address:
        results = _on_ray(runner, argvs, ray_address)
    elif workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(runner, argvs))
    else:
        results = map(runner, argvs)
    for done, ((run, action), outcome) in enumerate(zip(todo, results), start=1):
        outcomes[run.folder] = outcome
        state = "done" if outcome["code"] == 0 else f"failed: {outcome['error']}"
        say(f"[{done}/{len(todo)}] {_label(run)} ({action}): {state}")
    return outcomes


def _label(run: PlannedRun) -> str:
    return f"{run.task.name} seed {run.seed} {run.method.name}"


def _on_ray(runner: Runner, argvs: list[list[str]], address: str) -> list[dict[str, Any]]:
    """Each run as one Ray task; `address` "local" starts a private local instance."""
    try:
        import ray
    except ImportError:
        raise SuiteError("--ray needs Ray: pip install 'ray>=2.9'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=True)
    try:
        remote = ray.remote(num_cpus=1)(runner)
        return ray.get([remote.remote(argv) for argv in argvs])
    finally:
        if started_here:
            ray.shutdown()


# ------------------------------------------------------------------------------ the table

def collect(runs: Sequence[PlannedRun], outcomes: dict[Path, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per run from its folder (a run not finished says why)."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"task": run.task.name, "seed": run.seed, "method": run.method.name,
                               "run_dir": str(run.folder)}
        result_path = run.folder / "result.json"
        if result_path.exists():
            result = json.loads(result_path.read_text())
            row.update(status="finished", **{key: result.get(key) for key in RESULT_COLUMNS
                                             if key in result and key not in ("task", "seed")})
        else:
            outcome = (outcomes or {}).get(run.folder)
            row.update(status="failed" if outcome else "not run", error=(outcome or {}).get("error", ""))
        rows.append({column: row.get(column, "") for column in RESULT_COLUMNS})
    return rows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The tasks (in order) and the table's rows: for each method its tuned test accuracy,
    and for each distinct starting point its z = 0 accuracy; per task the mean and std
    over seeds (of the seeds that finished, counted in the cell), and `average`, the mean
    of the per-task means (None unless every task has a finished run)."""
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    finished = [row for row in rows if row["status"] == "finished"]
    table = []

    def table_row(label: str, kind: str, method: str, column: str) -> dict[str, Any]:
        cells = {}
        for task in tasks:
            values = [float(row[column]) for row in finished if row["task"] == task and row["method"] == method
                      and row[column] not in ("", None)]
            cells[task] = (*mean_std(values), len(values)) if values else None
        means = [cell[0] for cell in cells.values() if cell is not None]
        average = sum(means) / len(means) if means and len(means) == len(tasks) else None
        planned = {task: sum(row["task"] == task and row["method"] == method for row in rows) for task in tasks}
        return {"row": label, "kind": kind, "method": method, "cells": cells, "planned": planned,
                "average": average}

    starts: dict[tuple, str] = {}
    for method in methods:
        own = [row for row in finished if row["method"] == method]
        # A delta with no prompt tokens changes nothing at z = 0: the template alone.
        manual = bool(own) and all(str(row["prompt_length"]) in ("0", "") for row in own)
        label = f"manual prompt (z = 0 of {method})" if manual else f"z = 0 ({method})"
        start = table_row(label, "zero-shot", method, "zero_shot_test_acc")
        key = tuple((task, None if cell is None else round(cell[0], 6)) for task, cell in start["cells"].items())
        if any(cell is not None for cell in start["cells"].values()) and key not in starts:
            starts[key] = method
            table.append(start)
    # A method that searched nothing (--budget 0) has its starting point as its only row.
    searched = [m for m in methods
                if any(str(r.get("api_calls")) not in ("0", "") for r in finished if r["method"] == m)]
    table += [table_row(method, "tuned", method, "test_acc") for method in searched]
    return tasks, table


def _percent(cell, planned: int = 0) -> str:
    """mean ± std, and how many of the planned seeds it covers where that is not all."""
    if cell is None:
        return "-"
    mean, std, count = cell
    text = f"{100 * mean:.1f} ± {100 * std:.1f}" if count > 1 else f"{100 * mean:.1f}"
    return text + (f" ({count} of {planned} seeds)" if count < planned else "")


def markdown(tasks: Sequence[str], table: Sequence[dict[str, Any]], anchors: dict | None = None) -> str:
    header = ["method", *tasks, "average"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in table:
        average = "-" if row["average"] is None else f"{100 * row['average']:.1f}"
        lines.append("| " + " | ".join([row["row"], *(_percent(row["cells"][t], row["planned"][t]) for t in tasks), average]) + " |")
    text = "\n".join(lines) + "\n"
    text += "\nTest accuracy (%), mean ± standard deviation over seeds; average: the mean of the per-task means.\n"
    if anchors:
        text += "\n" + anchor_markdown(tasks, anchors)
    return text


def anchor_markdown(tasks: Sequence[str], anchors: dict) -> str:
    """The published rows on our tasks' columns, labelled with their backbone, metric
    notes and sources (each source listed once, numbered)."""
    backbone = anchors.get("backbone", "another backbone")
    header = [f"published, {backbone}", *tasks, "published average", "source"]
    lines = [f"Published results on {backbone}, not on this backbone ({anchors.get('setting', '')}):", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
    sources: list[str] = []
    for row in anchors.get("rows", []):
        accuracy = row.get("accuracy") or {}
        cells = [f"{accuracy[t]:.1f}" if accuracy.get(t) is not None else "-" for t in tasks]
        average = row.get("average")
        source = row.get("source") or {}
        cite = "; ".join(str(source[key]) for key in ("paper", "arxiv", "table", "url") if source.get(key))
        if cite not in sources:
            sources.append(cite)
        lines.append("| " + " | ".join([row.get("method", "?"), *cells, "-" if average is None else f"{average:.1f}",
                                        f"[{sources.index(cite) + 1}]"]) + " |")
    lines += ["", *(f"[{number}] {cite}" for number, cite in enumerate(sources, start=1))]
    lines += [f"- {note}" for note in anchors.get("notes", [])]
    return "\n".join(lines) + "\n"


def load_anchors(path: str | Path | None = None) -> dict:
    path = Path(path) if path else Path(__file__).parent / "data" / "anchors.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise SuiteError(f"no published results file at {path}") from None
    except ValueError as error:
        raise SuiteError(f"{path} is not valid JSON: {error}") from None


def write_outputs(out: str | Path, rows: Sequence[dict[str, Any]], anchors: dict | None = None) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.csv", "table_csv": out / "table.csv", "table_md": out / "table.md",
             "table_png": out / "table.png"}
    with files["results"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tasks, table = aggregate(rows)
    with files["table_csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "kind", *(f"{task}_{part}" for task in tasks for part in ("mean", "std", "seeds")),
                         "average"])
        for row in table:
            cells = [value for task in tasks for value in (row["cells"][task] or ("", "", 0))]
            writer.writerow([row["row"], row["kind"], *cells, "" if row["average"] is None else row["average"]])
    files["table_md"].write_text(markdown(tasks, table, anchors))
    plot_table(tasks, table, files["table_png"])
    return files


def run_suite(tasks: Sequence[str], seeds: Sequence[int], methods: Sequence[Method], out: str | Path,
              runner: Runner, backbone: Sequence[str] = (), workers: int = 1, ray_address: str | None = None,
              anchors: dict | None = None, say: Callable[[str], None] = print,
              table_only: bool = False) -> tuple[list[dict[str, Any]], dict]:
    """Plans, runs what is not finished (nothing with `table_only`), and writes the table
    from the run folders; returns the rows and files."""
    if workers < 1:
        raise SuiteError(f"--workers must be >= 1, got {workers}")
    runs = plan(tasks, seeds, methods, out)
    outcomes = {} if table_only else execute(runs, backbone, runner, workers=workers, ray_address=ray_address,
                                             say=say)
    rows = collect(runs, outcomes)
    return rows, write_outputs(out, rows, anchors)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SuiteError(f"--seeds takes integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SuiteError(f"--seeds takes distinct integers separated by commas, got {text!r}")
    return seeds


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
