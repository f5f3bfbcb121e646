"""`blackbox intrinsic-dim`: test accuracy against the intrinsic dimension d, and d90.

A sweep tunes the same task and delta through random d-dimensional subspaces for each d
and seed (theta = theta0 + P z, Li et al. 2018; Aghajanyan et al. 2021). Each (d, seed)
is one `blackbox tune` run with `--dim d`, planned and run by the suite runner
(`blackbox.suite`: one run folder each, `DIR/runs/TASK/dD/seed-S`, a local pool or Ray,
finished runs skipped, so a killed sweep resumes). The 100% level, the reference, is one
of:

- "gradient": the white-box gradient mode on the whole delta through the identity
  projection (d = D, which the runs' result.json gives as `delta_size`), one run per
  seed in `DIR/runs/TASK/reference/seed-S`; the server must allow gradients;
- an accuracy given on the command line;
- "best": the best mean test accuracy the sweep itself reaches, which makes d90 a
  statement about the curve's own plateau; d90.json and the output say so.

Outputs: `sweep.csv` (one row per run), `d90.json` (`blackbox.intrinsic_curve`: d90 by
interpolating the mean curve in log d, a bootstrap interval over seeds) and
`accuracy_vs_d.png`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from blackbox import intrinsic_curve
from blackbox.suite import Method, PlannedRun, Runner, SuiteError, collect, execute, plan

# d: the coordinates searched (z's length: --dim, plus SAID's per-layer scales, as
# Aghajanyan et al. count them); projection_dim: the --dim the run was given.
SWEEP_COLUMNS = ("task", "run", "d", "projection_dim", "seed", "D", "budget", "best_dev_acc", "test_acc", "api_calls", "status", "delta",
                 "projection", "optimizer", "run_dir", "error")
REFERENCE_METHOD = "reference"
# Options the sweep sets for each run (the suite's own, --task, --seed, --out, ..., too).
_SWEEP_OWNS = ("--dim",)


@dataclass(frozen=True)
class Reference:
    """How the 100% level is obtained: "gradient", "best", or a given accuracy."""

    source: str
    accuracy: float | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if text in ("gradient", "best"):
            return cls(text)
        try:
            accuracy = float(text)
        except ValueError:
            raise SuiteError(f"--reference takes gradient, best or an accuracy in (0, 1], got {text!r}") from None
        if not 0 < accuracy <= 1:
            raise SuiteError(f"--reference: an accuracy is in (0, 1] (0.8, not 80), got {text!r}")
        return cls("given", accuracy)


@dataclass(frozen=True)
class SweepPlan:
    task: str  # a built-in name or a task file
    dims: tuple[int, ...]
    seeds: tuple[int, ...]
    options: tuple[str, ...]  # `blackbox tune` options shared by every run
    budgets: dict[int, int]  # d -> API calls
    reference: Reference
    reference_budget: int = 200

    def sweep_methods(self) -> list[Method]:
        return [Method.of(f"d{d}", [*self.options, "--dim", str(d), "--budget", str(self.budgets[d])])
                for d in self.dims]

    def reference_method(self, delta_size: int) -> Method:
        """The gradient mode on the whole delta: the identity projection, d = D."""
        return Method.of(REFERENCE_METHOD, [*self.options, "--optimizer", "gradient", "--projection", "identity",
                                            "--dim", str(delta_size), "--budget", str(self.reference_budget),
                                            "--no-calibrate"])


def budgets_for(dims: Sequence[int], budget: int, budget_per_dim: int = 0, popsize: int = 20) -> dict[int, int]:
    """Each d's API calls: `budget` for every d, or `budget_per_dim` x d (CMA-ES needs more
    calls as d grows), at least one generation."""
    if budget_per_dim < 0:
        raise SuiteError(f"--budget-per-dim must be >= 0, got {budget_per_dim}")
    if budget_per_dim:
        return {d: max(popsize, budget_per_dim * d) for d in dims}
    return {d: budget for d in dims}


def check_options(options: Sequence[str]) -> None:
    owned = [option for option in options if option.split("=")[0] in _SWEEP_OWNS]
    if owned:
        raise SuiteError(f"{', '.join(owned)}: the sweep sets d for each run; give the values with --dims")


def run_sweep(sweep: SweepPlan, out: str | Path, runner: Runner, backbone: Sequence[str] = (), workers: int = 1,
              ray_address: str | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs what is not finished (the sweep, then the reference runs it needs) and writes
    sweep.csv, d90.json and accuracy_vs_d.png; returns d90.json's content with `files`."""
    out = Path(out)
    sweep_runs = plan([sweep.task], list(sweep.seeds), sweep.sweep_methods(), out)
    outcomes = execute(sweep_runs, backbone, runner, workers=workers, ray_address=ray_address, say=say)
    rows = _rows(sweep_runs, outcomes, kind="sweep")
    reference_rows: list[dict[str, Any]] = []
    if sweep.reference.source == "gradient":
        sizes = {row["D"] for row in rows if row["status"] == "finished" and row["D"]}
        if not sizes:
            raise SuiteError("--reference gradient needs the delta's size D from a finished sweep run, and none "
                             "finished (or the server is too old to say D)")
        reference_runs = plan([sweep.task], list(sweep.seeds), [sweep.reference_method(max(sizes))], out)
        say(f"reference: the gradient mode on the whole delta (identity projection, d = D = {max(sizes)}), "
            f"{sweep.reference_budget} steps a seed")
        outcomes = execute(reference_runs, backbone, runner, workers=workers, ray_address=ray_address, say=say)
        reference_rows = _rows(reference_runs, outcomes, kind=REFERENCE_METHOD)
    return write_outputs(out, sweep, rows, reference_rows)


def _rows(runs: Sequence[PlannedRun], outcomes: dict, kind: str) -> list[dict[str, Any]]:
    """sweep.csv's rows: the suite's, with d and D from each run's result.json."""
    rows = []
    for run, row in zip(runs, collect(runs, outcomes)):
        result_path = run.folder / "result.json"
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        rows.append({**{column: row.get(column, "") for column in SWEEP_COLUMNS}, "run": kind,
                     "d": result.get("z_dim") or _last_value(run.method, "--dim"),
                     "projection_dim": _last_value(run.method, "--dim"),
                     "D": result.get("delta_size") or "",
                     "budget": result.get("budget") or _last_value(run.method, "--budget"),
                     "projection": result.get("projection", "")})
    return rows


def _last_value(method: Method, option: str) -> int:
    """The value of the last `option` in a method the sweep built (it appends its own)."""
    options = list(method.options)
    return int(options[len(options) - options[::-1].index(option)])


def write_outputs(out: Path, sweep: SweepPlan, rows: Sequence[dict[str, Any]],
                  reference_rows: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"sweep": out / "sweep.csv", "d90": out / "d90.json", "plot": out / "accuracy_vs_d.png"}
    with files["sweep"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        writer.writerows([*rows, *reference_rows])
    finished = [row for row in rows if row["status"] == "finished" and row["test_acc"] not in ("", None)]
    if not finished:
        raise SuiteError(f"no run of the sweep finished (see {files['sweep']})")
    dims, means, stds, counts = intrinsic_curve.mean_curve(finished)
    reference, source, reference_done = _reference(sweep.reference, dims, means, reference_rows)
    estimate = intrinsic_curve.d90(dims, means, reference)
    bootstrap = intrinsic_curve.bootstrap_d90(finished, reference, reference_rows=reference_done or None)
    sizes = sorted({int(row["D"]) for row in finished if row["D"] not in ("", None)})
    budget_of = {int(row["d"]): int(row["budget"]) for row in finished if row["budget"] not in ("", None)}
    summary = {
        "task": finished[0].get("task") or sweep.task,
        "d90": estimate,
        "reached": estimate is not None,
        "interval": bootstrap["interval"],
        "interval_level": bootstrap["level"],
        "bootstrap": {"resamples": bootstrap["resamples"], "reached_fraction": bootstrap["reached_fraction"],
                      "unit": "seed"},
        "reference": reference,
        "reference_source": source,
        "fraction": 0.9,
        "threshold": 0.9 * reference,
        "D": sizes[-1] if sizes else None,
        "curve": [{"d": int(d), "mean_test_acc": float(m), "std": float(s), "seeds": int(c),
                   "budget": budget_of.get(int(d))} for d, m, s, c in zip(dims, means, stds, counts)],
        "runs": {"planned": len(rows), "finished": len(finished)},
        "how": "d90: the smallest d whose mean test accuracy over seeds reaches 90% of the reference, "
               "interpolated linearly in log d between the last d below and the first d at or above it "
               "(the first crossing where the curve is not monotone; the smallest d measured when that one "
               "already reaches it); interval: percentile bootstrap over seeds",
    }
    if sweep.reference.source != "best":  # where the curve itself levels off, for comparison
        best = float(max(means))
        summary["d90_of_the_sweeps_best"] = {"d90": intrinsic_curve.d90(dims, means, best), "reference": best}
    if estimate is None:
        summary["note"] = (f"not reached: the largest d ({int(dims[-1])}) stays below 90% of the reference "
                           f"({100 * max(means):.1f}% < {100 * 0.9 * reference:.1f}%)")
    files["d90"].write_text(json.dumps(summary, indent=2) + "\n")
    short_source = {"given": "given", "best": "the sweep's best", "gradient": "gradient, whole delta"}
    intrinsic_curve.plot_sweep(dims, means, stds, reference, estimate, bootstrap["interval"], files["plot"],
                               title=f"{summary['task']}: test accuracy against d (reference: "
                                     f"{short_source[sweep.reference.source]})")
    return {**summary, "files": files}


def _reference(reference: Reference, dims, means, reference_rows) -> tuple[float, str, list[dict[str, Any]]]:
    """The 100% level, the words for how it was obtained, and the reference runs it rests on."""
    if reference.source == "given":
        return reference.accuracy, "given on the command line (--reference)", []
    if reference.source == "best":
        best = int(max(range(len(means)), key=lambda i: means[i]))
        return (float(means[best]), f"the sweep's own best mean test accuracy (d = {int(dims[best])}): d90 is "
                                    "relative to the curve's plateau, not to tuning the whole delta", [])
    done = [row for row in reference_rows if row["status"] == "finished" and row["test_acc"] not in ("", None)]
    if not done:
        raise SuiteError("no reference run finished: the gradient mode needs a server started with "
                         "--allow-gradients (an embedded one allows it); see sweep.csv")
    accuracy = sum(float(row["test_acc"]) for row in done) / len(done)
    return accuracy, (f"the gradient mode on the whole delta (identity projection, d = D), mean test accuracy "
                      f"over {len(done)} seed(s)"), done
