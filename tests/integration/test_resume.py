"""A run stopped after generation k and resumed ends exactly where the same run done in
one go ends: same z, same losses, same log lines (timings aside)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backbone_server.server import create_server
from blackbox import cli
from blackbox.cli import main
from blackbox.client import BackboneClient, Session
from blackbox.runlog import RunDirError, RunLog, read_log
from blackbox.tune_config import TuneConfig, resume_config
from blackbox.tuner import run_tune

TIMING_KEYS = ("server_ms", "generation_ms", "elapsed_s")
# metered_calls counts the calls of one process: a resumed run counts from where it resumed.
RESULT_TIMING_KEYS = ("wall_s", "files", "metered_calls")


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


# ------------------------------------------- a run stopped before its first checkpoint

# `blackbox tune` options giving the same run as `config(out, 24)`.
CLI_RUN = ["tune", "--recipe", "bbt", "--task", "rte", "--seed", "13", "--budget", "24", "--popsize", "4",
           "--dim", "6", "--prompt-length", "2", "--placement", "after", "--truncate", "--quiet"]

# In a process of its own: `blackbox ARGV`, stalled (marker file written) at STALL, where a
# test SIGKILLs it. "zero-shot": in the zero-shot test pass, before any generation;
# "first checkpoint": after the first generation's log line, before its checkpoint.
STALLING_TUNE = """
import sys, time
from pathlib import Path
from blackbox.client import Session
from blackbox.runlog import RunLog
from blackbox.cli import main

argv, stall, marker = {argv!r}, {stall!r}, Path({marker!r})

def stalled(*args, **kwargs):
    marker.write_text("stalled")
    time.sleep(3600)

if stall == "zero-shot":
    evaluate = Session.evaluate
    Session.evaluate = lambda self, split, *a, **k: stalled() if split == "test" else evaluate(self, split, *a, **k)
else:
    RunLog.write_checkpoint = stalled
raise SystemExit(main(argv))
"""


def kill_when_stalled(argv, stall, tmp_path):
    marker = tmp_path / f"stalled-{stall}"
    script = STALLING_TUNE.format(argv=argv, stall=stall, marker=str(marker))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it stalled: {process.stderr.read().decode()}")
        assert time.monotonic() < deadline, "the run never stalled"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()


def result_file(out):
    return result_without_timings(json.loads((out / "result.json").read_text()))


@pytest.fixture(scope="module", params=["zero-shot", "first checkpoint"])
def killed_early(request, client, tmp_path_factory):
    """A folder of `CLI_RUN` SIGKILLed before its first checkpoint (at the param's stall)."""
    tmp_path = tmp_path_factory.mktemp("killed-early")
    killed = tmp_path / "run"
    kill_when_stalled([*CLI_RUN, "--server", client.address, "--out", str(killed)], request.param, tmp_path)
    assert (killed / "config.json").exists() and not (killed / "checkpoint.pkl").exists()
    assert len(log_without_timings(killed)) == (0 if request.param == "zero-shot" else 1)
    return killed


def a_copy(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / "run"))


def assert_ends_as_one_go(out, reference_dir):
    assert result_file(out) == result_file(reference_dir)
    assert log_without_timings(out) == log_without_timings(reference_dir)
    np.testing.assert_array_equal(np.load(out / "best_z.npy"), np.load(reference_dir / "best_z.npy"))


def test_resume_starts_a_run_killed_before_its_first_checkpoint_from_the_beginning(client, tmp_path, one_go,
                                                                                   killed_early, capsys):
    out = a_copy(killed_early, tmp_path)
    assert resume_config(str(out)) == config(out, 24)  # its own settings, from config.json
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["tune", "--server", client.address, "--quiet", "--resume", "--out", str(out)]) == 0
    assert signal.getsignal(signal.SIGTERM) is handler  # main's SIGTERM handler is put back
    said = capsys.readouterr().err
    assert said.count("starts from the beginning") == 1, said
    assert_ends_as_one_go(out, one_go[0])


def test_a_plain_rerun_replaces_a_run_killed_before_its_first_checkpoint(client, tmp_path, one_go, killed_early,
                                                                         capsys):
    out = a_copy(killed_early, tmp_path)
    capsys.readouterr()
    assert main([*CLI_RUN, "--server", client.address, "--out", str(out)]) == 0  # nothing to lose there
    assert f"starting {out} again" in capsys.readouterr().err
    assert_ends_as_one_go(out, one_go[0])

    # A checkpoint, or a result, is still never replaced without --overwrite.
    files = {path.name: path.read_bytes() for path in out.iterdir()}
    assert main([*CLI_RUN, "--server", client.address, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    for name in ("result.json", "best_z.npy", "curve.png"):
        (out / name).unlink()
    assert main([*CLI_RUN, "--server", client.address, "--out", str(out)]) == 2
    assert "already holds a run (config.json, log.jsonl, checkpoint.pkl)" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == {
        name: data for name, data in files.items() if name in ("config.json", "log.jsonl", "checkpoint.pkl")}


def test_resume_refuses_a_folder_with_no_run(tmp_path, capsys):
    (tmp_path / "log.jsonl").write_text("")  # a run killed before it wrote its config.json
    assert main(["tune", "--quiet", "--out", str(tmp_path), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------- SIGTERM

def test_sigterm_ends_a_run_as_ctrl_c_does_closing_its_session_and_keeping_its_checkpoint(tmp_path):
    running = create_server("tiny-llama", "127.0.0.1:0", device="cpu", dtype="float32")
    try:
        running.wait_ready(timeout=120)
        sessions = running.servicer.engine.sessions
        out = tmp_path / "run"
        argv = [*CLI_RUN, "--budget", "40000", "--server", running.address, "--out", str(out)]
        script = f"from blackbox.cli import main; raise SystemExit(main({argv!r}))"
        process = subprocess.Popen([sys.executable, "-c", script],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not ((out / "checkpoint.pkl").exists() and len(sessions) > 0):  # scoring generations
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "the run never got to its first checkpoint"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        said = process.stderr.read()
        assert code == 143, said
        assert said.splitlines()[-1] == "terminated", said
        assert len(sessions) == 0  # closed on the way out, not left to the server
        assert not (out / "result.json").exists()

        # The checkpoint is whole: the run goes on from it, to a budget a little past it.
        spent = RunLog.read_checkpoint(out)["api_calls"]
        with BackboneClient(running.address) as client:
            resumed = run_tune(resume_config(str(out), budget=spent + 8), client, show_progress=False, resume=True)
        assert resumed["api_calls"] == spent + 8
        generations = [line["generation"] for line in read_log(out / "log.jsonl")]
        assert generations == list(range(1, resumed["generations"] + 1))
        assert len(sessions) == 0
    finally:
        running.stop(grace=0)


def test_sigterm_in_a_run_of_a_suite_stops_the_suite_not_just_the_run(monkeypatch, capsys):
    """A suite (or a sweep) runs each of its runs through a `main` of its own, in its own
    process: the interrupt that ends the run under way (closing its session) must end the
    suite too, not go on to the next run."""

    class Outside(Exception):
        pass

    def outside(signum, frame):
        raise Outside("SIGTERM reached the handler main should have put in place")

    started = []

    def fake_tune(args):
        if args.out == "suite":  # the suite: its runs one after another, as run_tune_argv does them
            return max(cli.run_tune_argv(["tune", "--out", f"run-{number}"])["code"] for number in range(3))
        started.append(args.out)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, "_tune", fake_tune)
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        assert cli.main(["tune", "--out", "suite"]) == 143
        assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert started == ["run-0"]
    assert capsys.readouterr().err.splitlines()[-1] == "terminated"
