"""`--server A,B,...`: populations split over local replicas give what one server gives,
and a replica that goes away mid-run has its share scored by the others."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import grpc
import numpy as np
import pytest

from backbone_server.server import create_server
from blackbox.cli import main
from blackbox.client import BackboneClient, BackboneError, DeltaSpec, Session
from blackbox.replicas import ReplicaPool
from blackbox.tasks import Example
from blackbox.tune_config import TuneConfig
from blackbox.tuner import run_tune

TRAIN = [Example("a great film", None, 1), Example("a bad film", None, 0), Example("very good", None, 1),
         Example("not good at all", None, 0)]
TEMPLATE = "{text_a} It was {mask}"
VERBALIZER = ["bad", "great"]
DELTA = DeltaSpec(prompt_length=3, intrinsic_dim=4)
TIMING_KEYS = ("server_ms", "generation_ms", "elapsed_s")


def start(model="tiny-llama", address="127.0.0.1:0"):
    # One at a time: tiny models are built from torch's global seed, so two loading at
    # once could get different weights.
    running = create_server(model, address, device="cpu", dtype="float32")
    running.wait_ready(timeout=120)
    return running


@pytest.fixture(scope="module")
def servers():
    running = [start() for _ in range(3)]
    yield running
    for server in running:
        server.stop(grace=0)


@pytest.fixture
def victims():
    """Two replicas a test may stop."""
    running = [start(), start()]
    yield running
    for server in running:
        server.stop(grace=0)


def population(size=7):
    return np.random.default_rng(0).normal(size=(size, DELTA.intrinsic_dim)).astype(np.float32)


def reference(server, z, **kwargs):
    with BackboneClient(server.address) as client:
        session = client.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA)
        return session.evaluate("train", z, **kwargs)


def assert_same_scores(got, want):
    for field in ("ce_loss", "hinge_loss", "accuracy", "logits"):
        if getattr(want, field) is None:
            assert getattr(got, field) is None, field
        else:
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=1e-6, err_msg=field)
    assert got.num_examples == want.num_examples


def pooled_session(addresses, **options):
    pool = ReplicaPool(addresses, **options)
    pool.wait_ready(timeout=30)
    return pool, pool.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA)


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_population_split_over_replicas_scores_as_on_one(servers, replicas):
    z = population()
    want = reference(servers[0], z, return_logits=True)
    pool, session = pooled_session([s.address for s in servers[:replicas]])
    with pool:
        assert session.split_sizes == {"train": len(TRAIN)} and len(session.sessions) == replicas
        assert_same_scores(session.evaluate("train", z, return_logits=True), want)
        assert session.evaluate("train", z).logits is None
        for row in (0, 6):  # single candidates go to one replica, in turn
            single = session.evaluate("train", z[row])
            np.testing.assert_allclose(single.ce_loss, want.ce_loss[row:row + 1], atol=1e-6)
        sliced = session.evaluate("train", z, start=1, count=2)
        assert sliced.num_examples == 2 and sliced.ce_loss.shape == (7,)
        session.close()


def test_two_replicas_tune_exactly_like_one(servers, tmp_path):
    def tune(client, out):
        config = TuneConfig(task="sst2", seed=13, budget=18, popsize=6, dim=8, prompt_length=3,
                            placement="after", out=str(out))
        result = run_tune(config, client, show_progress=False)
        log = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
               for line in (out / "log.jsonl").read_text().splitlines()]
        return result, log

    with BackboneClient(servers[0].address) as client:
        one, one_log = tune(client, tmp_path / "one")
    with ReplicaPool([servers[0].address, servers[1].address]) as pool:
        two, two_log = tune(pool, tmp_path / "two")
    for key in ("best_dev_acc", "test_acc", "api_calls", "generations", "zero_shot_test_acc", "test_loss"):
        assert two[key] == one[key], key
    assert two_log == one_log and len(one_log) == 3
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "best_z.npy"), np.load(tmp_path / "one" / "best_z.npy"))


def test_a_replica_stopped_mid_run_has_its_share_retried(servers, victims, caplog):
    z = population()
    want = reference(servers[0], z)
    pool, session = pooled_session([servers[0].address, victims[0].address, servers[1].address])
    with pool, caplog.at_level(logging.WARNING, logger="blackbox.replicas"):
        assert_same_scores(session.evaluate("train", z), want)
        victims[0].stop(0)
        for _ in range(2):
            assert_same_scores(session.evaluate("train", z), want)
        assert pool.live() == [0, 2]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and victims[0].address in warnings[0] and "UNAVAILABLE" in warnings[0]
        session.close()  # best effort, on the survivors


def test_a_replica_that_lost_the_session_gets_it_again(servers, caplog):
    z = population()
    want = reference(servers[0], z)
    pool, session = pooled_session([servers[0].address, servers[1].address])
    with pool, caplog.at_level(logging.WARNING):
        lost = session.sessions[1].id
        session.sessions[1].close()  # as if that server had restarted
        assert_same_scores(session.evaluate("train", z), want)  # its share retried on the other
        assert_same_scores(session.evaluate("train", z), want)
        assert pool.live() == [0, 1] and session.sessions[1].id != lost
        assert any("is back" in r.getMessage() for r in caplog.records)


def test_a_replica_that_comes_back_takes_its_share_again(victims, monkeypatch):
    monkeypatch.setattr("blackbox.replicas.REPROBE_S", 0.2)
    z = population()
    want = reference(victims[1], z)
    pool, session = pooled_session([v.address for v in victims])
    with pool:
        address = victims[0].address
        victims[0].stop(0)
        assert_same_scores(session.evaluate("train", z), want)
        assert pool.live() == [1]
        victims[0] = start(address=address)  # the same replica, restarted
        for _ in range(20):
            assert_same_scores(session.evaluate("train", z), want)
            if pool.live() == [0, 1]:
                break
            time.sleep(0.2)
        assert pool.live() == [0, 1]
        served = victims[0].servicer.engine.sessions
        assert len(served) == 1


def test_an_internal_error_of_one_replica_is_raised_not_taken_for_gone(servers, monkeypatch):
    pool, session = pooled_session([servers[0].address, servers[1].address])

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    with pool:
        monkeypatch.setattr(servers[1].servicer.engine, "evaluate", broken)
        with pytest.raises(BackboneError) as caught:
            session.evaluate("train", population())
        assert caught.value.code == grpc.StatusCode.INTERNAL and pool.live() == [0, 1]


def test_all_replicas_dead_is_an_error_naming_each(victims):
    pool, session = pooled_session([v.address for v in victims], recover_s=0.5)
    with pool:
        for victim in victims:
            victim.stop(0)
        with pytest.raises(BackboneError, match="all replicas failed") as caught:
            session.evaluate("train", population())
        assert all(v.address in str(caught.value) for v in victims)
        assert pool.live() == []


def test_replicas_of_different_models_are_refused(servers):
    roberta = start("tiny-roberta")
    try:
        with ReplicaPool([servers[0].address, roberta.address]) as pool:
            with pytest.raises(ValueError, match=f"replicas differ: {roberta.address} has model_name 'tiny-roberta'"):
                pool.wait_ready(timeout=30)
    finally:
        roberta.stop(grace=0)


def test_a_callers_error_is_raised_not_retried(servers):
    pool, session = pooled_session([servers[0].address, servers[1].address])
    with pool:
        with pytest.raises(BackboneError) as caught:
            session.evaluate("train", np.zeros((4, DELTA.intrinsic_dim + 1), dtype=np.float32))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(BackboneError) as caught:
            session.evaluate("nope", population())
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert pool.live() == [0, 1] and not pool.errors


@dataclasses.dataclass
class FakeGradient:
    loss: np.ndarray
    grad: np.ndarray
    num_examples: int
    server_ms: float


def test_gradients_are_split_and_merged_the_same_way(servers, monkeypatch):
    def gradient(self, split, z, start=0, count=0, loss="ce"):
        return FakeGradient(loss=z.sum(axis=1), grad=2 * z, num_examples=count or 4, server_ms=float(len(z)))

    monkeypatch.setattr(Session, "gradient", gradient, raising=False)
    z = population()
    pool, session = pooled_session([s.address for s in servers])
    with pool:
        result = session.gradient("train", z, count=3)
    np.testing.assert_allclose(result.loss, z.sum(axis=1))
    np.testing.assert_allclose(result.grad, 2 * z)
    assert result.num_examples == 3 and result.server_ms == 3.0  # the largest share's


def test_the_command_line_takes_a_list_of_servers(servers, tmp_path):
    out = tmp_path / "run"
    assert main(["tune", "--server", f"{servers[0].address},{servers[1].address}", "--task", "rte", "--budget", "8",
                 "--popsize", "4", "--dim", "6", "--prompt-length", "2", "--placement", "after", "--truncate",
                 "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["api_calls"] == 8
