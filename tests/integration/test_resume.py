"""A run stopped after generation k and resumed ends exactly where the same run done in
one go ends: same z, same losses, same log lines (timings aside)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backbone_server.server import create_server
from blackbox.client import BackboneClient, Session
from blackbox.runlog import RunDirError
from blackbox.tune_config import TuneConfig, resume_config
from blackbox.tuner import run_tune

TIMING_KEYS = ("server_ms", "generation_ms", "elapsed_s")
RESULT_TIMING_KEYS = ("wall_s", "files")


@pytest.fixture(scope="module")
def client():
    running = create_server("tiny-llama", "127.0.0.1:0", device="cpu", dtype="float32")
    running.wait_ready(timeout=120)
    with BackboneClient(running.address) as client:
        yield client
    running.stop(grace=0)


def config(out, budget):
    return TuneConfig(task="rte", seed=13, budget=budget, popsize=4, dim=6, prompt_length=2, placement="after",
                      truncate=True, out=str(out))


def log_without_timings(out):
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def result_without_timings(result):
    return {k: v for k, v in result.items() if k not in RESULT_TIMING_KEYS}


@pytest.fixture(scope="module")
def one_go(client, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-go")
    return out, run_tune(config(out, 24), client, show_progress=False)


def test_smaller_budget_then_resume_equals_one_go(client, tmp_path, one_go):
    reference_dir, reference = one_go
    first = run_tune(config(tmp_path, 12), client, show_progress=False)
    assert first["generations"] == 3
    resumed = run_tune(resume_config(str(tmp_path), budget=24), client, show_progress=False, resume=True)
    assert result_without_timings(resumed) == result_without_timings(reference)
    assert log_without_timings(tmp_path) == log_without_timings(reference_dir)
    np.testing.assert_array_equal(np.load(tmp_path / "best_z.npy"), np.load(reference_dir / "best_z.npy"))


def test_killed_run_resumes_to_the_same_end(client, tmp_path, one_go, monkeypatch):
    reference_dir, reference = one_go
    original = Session.evaluate
    train_calls = []

    def dies_on_the_fourth_generation(self, split, z, *args, **kwargs):
        if split == "train":
            train_calls.append(1)
            if len(train_calls) == 4:
                raise KeyboardInterrupt
        return original(self, split, z, *args, **kwargs)

    monkeypatch.setattr(Session, "evaluate", dies_on_the_fourth_generation)
    with pytest.raises(KeyboardInterrupt):
        run_tune(config(tmp_path, 24), client, show_progress=False)
    monkeypatch.setattr(Session, "evaluate", original)
    assert len(log_without_timings(tmp_path)) == 3 and not (tmp_path / "result.json").exists()

    resumed = run_tune(resume_config(str(tmp_path)), client, show_progress=False, resume=True)
    assert result_without_timings(resumed) == result_without_timings(reference)
    assert log_without_timings(tmp_path) == log_without_timings(reference_dir)


def test_resume_refuses_what_it_cannot_continue(client, tmp_path, one_go):
    with pytest.raises(RunDirError, match="nothing to resume"):
        run_tune(config(tmp_path, 24), client, show_progress=False, resume=True)
    reference_dir, _ = one_go
    changed = config(reference_dir, 40)
    changed.popsize = 8
    files = {path.name: path.read_bytes() for path in reference_dir.iterdir()}
    with pytest.raises(ValueError, match="popsize: 4 -> 8"):
        run_tune(changed, client, show_progress=False, resume=True)
    assert {path.name: path.read_bytes() for path in reference_dir.iterdir()} == files


def test_patience_and_wall_clock_stop_the_run(client, tmp_path):
    patient = config(tmp_path / "patience", 400)
    patient.patience = 2
    result = run_tune(patient, client, show_progress=False)
    assert result["stop_reason"] == "patience"
    assert result["generations"] - result["best_generation"] == 2 and result["api_calls"] < 400

    hurried = config(tmp_path / "wall", 400)
    hurried.max_wall_s = 1e-3
    result = run_tune(hurried, client, show_progress=False)
    assert result["stop_reason"] == "wall_clock" and result["generations"] == 0
    assert result["test_acc"] == result["zero_shot_test_acc"]  # z = 0 stays the best

    assert run_tune(config(tmp_path / "budget", 8), client, show_progress=False)["stop_reason"] == "budget"


def test_a_budget_planned_search_resumes_only_with_its_budget(client, tmp_path):
    planned = config(tmp_path, 8)
    planned.optimizer = "ng:NGOpt"  # picks its algorithm from the budget
    run_tune(planned, client, show_progress=False)
    with pytest.raises(ValueError, match="planned its search"):
        run_tune(resume_config(str(tmp_path), budget=16), client, show_progress=False, resume=True)
