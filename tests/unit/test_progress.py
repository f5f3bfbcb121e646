"""A run's phases: a first and a last line always, an estimate of the rest once the
phase's own first step has been timed, nothing at all when silent."""

from __future__ import annotations

import io

import pytest

from blackbox import progress as progress_module
from blackbox.progress import Progress


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    return now


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_quiet_phase_says_its_start_its_estimate_and_its_end(clock):
    stream = io.StringIO()
    progress = Progress(bars=False, stream=stream)
    with progress.phase("zero-shot test", 1000, "example", "1000 test examples") as phase:
        clock[0] += 25.0
        phase.update(250)  # 25 s for a quarter: 75 s to go
        clock[0] += 25.0
        phase.update(250)  # said once only
        clock[0] += 50.0
        phase.update(500)
    assert lines(stream) == ["zero-shot test: 1000 test examples",
                             "zero-shot test: about 75 s left (250 of 1000 examples took 25 s)",
                             "zero-shot test: done in 1 min 40 s"]


def test_a_short_phase_has_no_estimate_and_a_resumed_one_counts_from_where_it_was(clock):
    stream = io.StringIO()
    progress = Progress(bars=False, stream=stream)
    with progress.phase("test", 100, "example") as phase:
        clock[0] += 1.0
        phase.update(50)
        phase.update(50)
    with progress.phase("search", 1000, "call", done=800) as phase:
        clock[0] += 60.0
        phase.update(100)  # 100 calls a minute, 100 to go
        phase.update(100)
    assert lines(stream) == ["test: 100 examples", "test: done in 1 s", "search: 200 calls",
                             "search: about 60 s left (100 of 200 calls took 60 s)", "search: done in 60 s"]


def test_silent_says_nothing(clock):
    stream = io.StringIO()
    with Progress(stream=stream, silent=True).phase("dev", 10, "example") as phase:
        clock[0] += 100.0
        phase.update(1)
    assert stream.getvalue() == ""
