"""Servers that die, restart or stall under a running client (issue 15): a tune rides out
two SIGKILLed restarts to exactly the result of an unfaulted run, and a stalled replica
is dropped by the keepalive instead of freezing the run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from blackbox.client import BackboneClient, DeltaSpec, Session
from blackbox.replicas import ReplicaPool
from blackbox.tasks import Example
from blackbox.tune_config import TuneConfig
from blackbox.tuner import run_tune

RESULT_TIMING_KEYS = ("wall_s", "files")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m backbone_server` with a tiny model on a fixed port, which a test may kill and start again."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "ServerProcess":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "backbone_server", "--model", "tiny-llama", "--port", str(self.port),
             "--device", "cpu", "--dtype", "float32"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if wait:
            with BackboneClient(self.address) as client:
                client.wait_ready(timeout=120)
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.kill()


@pytest.fixture
def server():
    running = ServerProcess().start()
    yield running
    running.stop()


def config(out):
    return TuneConfig(task="sst2", seed=13, budget=40, popsize=4, dim=6, prompt_length=2, placement="after",
                      test_limit=32, out=str(out))


def test_a_tune_rides_out_two_sigkilled_restarts_to_the_same_end(server, tmp_path, monkeypatch):
    with BackboneClient(server.address) as client:
        reference = run_tune(config(tmp_path / "unfaulted"), client, show_progress=False)

    original = Session.evaluate
    calls = {"train": 0, "dev": 0}
    restarts = []

    def restart_now():
        server.kill()  # SIGKILL: no goodbye, every session gone
        restarts.append(threading.Thread(target=server.start, kwargs={"wait": False}))
        restarts[-1].start()

    def with_faults(self, split, z, *args, **kwargs):
        if split in calls:
            calls[split] += 1
            if (split, calls[split]) in (("train", 3), ("dev", 2)):  # a generation, then a dev check
                restart_now()
        return original(self, split, z, *args, **kwargs)

    monkeypatch.setattr(Session, "evaluate", with_faults)
    heard = []
    with BackboneClient(server.address, recover_s=120, on_event=heard.append) as client:
        faulted = run_tune(config(tmp_path / "faulted"), client, show_progress=False)
    for thread in restarts:
        thread.join()
    assert len(restarts) == 2 and sum("re-created the session" in line for line in heard) == 2, heard
    assert {k: v for k, v in faulted.items() if k not in RESULT_TIMING_KEYS} == {
        k: v for k, v in reference.items() if k not in RESULT_TIMING_KEYS}
    np.testing.assert_array_equal(np.load(tmp_path / "faulted" / "best_z.npy"),
                                  np.load(tmp_path / "unfaulted" / "best_z.npy"))
    logs = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_ms") and k != "elapsed_s"}
             for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("faulted", "unfaulted")]
    assert logs[0] == logs[1]


def test_a_server_that_stays_down_ends_the_run_with_one_clear_error(server, tmp_path):
    with BackboneClient(server.address, recover_s=1.5) as client:
        session = client.create_session({"train": [Example("good", None, 1), Example("bad", None, 0)]},
                                        "{text_a} It was {mask}", ["bad", "great"], DeltaSpec(prompt_length=2,
                                                                                               intrinsic_dim=4))
        server.kill()
        began = time.monotonic()
        with pytest.raises(TimeoutError, match="no backbone server ready"):
            session.evaluate("train", np.zeros((2, 4), np.float32))
        assert time.monotonic() - began < 10


def test_a_stalled_replica_is_dropped_by_the_keepalive(monkeypatch):
    """Defect 5: a SIGSTOPped replica used to freeze a run with no deadline and no keepalive."""
    monkeypatch.setattr("blackbox.v1.channel.KEEPALIVE_TIME_MS", 1000)
    monkeypatch.setattr("blackbox.v1.channel.KEEPALIVE_TIMEOUT_MS", 1000)
    monkeypatch.setattr("blackbox.replicas.REPROBE_S", 0.5)
    replicas = [ServerProcess().start(), ServerProcess().start()]
    try:
        with ReplicaPool([r.address for r in replicas], recover_s=5) as pool:
            session = pool.create_session({"train": [Example("good", None, 1), Example("bad", None, 0)]},
                                          "{text_a} It was {mask}", ["bad", "great"],
                                          DeltaSpec(prompt_length=2, intrinsic_dim=4))
            z = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
            want = session.evaluate("train", z)
            os.kill(replicas[1].process.pid, signal.SIGSTOP)
            began = time.monotonic()
            got = session.evaluate("train", z)
            assert time.monotonic() - began < 15 and pool.live() == [0]
            np.testing.assert_array_equal(got.ce_loss, want.ce_loss)
            os.kill(replicas[1].process.pid, signal.SIGCONT)  # it wakes up: it takes its share again
            deadline = time.monotonic() + 20
            while pool.live() != [0, 1] and time.monotonic() < deadline:
                np.testing.assert_array_equal(session.evaluate("train", z).ce_loss, want.ce_loss)
                time.sleep(0.2)
            assert pool.live() == [0, 1]
    finally:
        for replica in replicas:
            replica.stop()
