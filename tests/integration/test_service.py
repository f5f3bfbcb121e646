"""The backbone as a service others are let into: keys, tenants, quotas, TLS, limits,
expiry, metrics, and the defects an outside client found (issue 15)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from backbone_server.engine import Limits
from backbone_server.server import Service, create_server, is_loopback
from backbone_server.tenants import KeysFileError, Tenant, TenantDirectory, load_tenants
from blackbox.client import BackboneClient, BackboneError, DeltaSpec
from blackbox.tasks import Example
from blackbox.v1 import backbone_pb2 as pb
from blackbox.v1 import backbone_pb2_grpc
from blackbox.v1.auth import hash_key
from blackbox.v1.wire import array_to_tensor

TRAIN = [Example("a great film", None, 1), Example("a bad film", None, 0), Example("very good", None, 1),
         Example("not good at all", None, 0)]
TEMPLATE = "{text_a} It was {mask}"
VERBALIZER = ["bad", "great"]
DELTA = DeltaSpec(prompt_length=3, intrinsic_dim=4)
KEYS = {"alice": "bbx_alice-secret", "bob": "bbx_bob-secret", "carol": "bbx_carol-secret"}


def tenants(**limits) -> TenantDirectory:
    """alice (with `limits`), bob and carol (without)."""
    return TenantDirectory({hash_key(key): Tenant(name, key_sha256=hash_key(key), **(limits if name == "alice" else {}))
                            for name, key in KEYS.items()})


def serve(backbone, **service):
    running = create_server("tiny-llama", "127.0.0.1:0", backbone=backbone, service=Service(**service))
    running.wait_ready(timeout=60)
    return running


def population(size=4, seed=0):
    return np.random.default_rng(seed).normal(size=(size, DELTA.intrinsic_dim)).astype(np.float32)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(BackboneError) as caught:
        call()
    return caught.value.code, caught.value.details


@pytest.fixture(scope="module")
def keyed(tiny_llama):
    running = serve(tiny_llama, tenants=tenants(quota_calls=0, max_sessions=2, max_examples=50))
    yield running
    running.stop(grace=0)


def connect(server, tenant: str | None = None, **options) -> BackboneClient:
    client = BackboneClient(server.address, api_key=KEYS.get(tenant, tenant) if tenant else "", **options)
    client.wait_ready(timeout=30)
    return client


# ---- keys and tenants ------------------------------------------------------------------

def test_no_key_and_a_wrong_key_are_unauthenticated_and_health_needs_none(keyed, monkeypatch):
    monkeypatch.delenv("BLACKBOX_API_KEY", raising=False)
    with connect(keyed) as anonymous:  # wait_ready: the health check answers without a key
        code, details = code_of(anonymous.get_info)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "--api-key" in details
    with connect(keyed, "bbx_not-a-key") as stranger:
        code, details = code_of(lambda: stranger.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "bbx_not-a-key" not in details
    with connect(keyed, "alice") as alice:
        assert alice.get_info().keyed


def test_the_key_comes_from_the_environment(keyed, monkeypatch):
    monkeypatch.setenv("BLACKBOX_API_KEY", KEYS["bob"])
    with BackboneClient(keyed.address) as client:
        assert client.usage().tenant == "bob"


def test_another_tenants_session_is_not_found_exactly_as_a_missing_one(keyed):
    with connect(keyed, "alice") as alice, connect(keyed, "bob") as bob:
        session = alice.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA)
        want = session.evaluate("train", population())
        z = array_to_tensor(population())
        stub = backbone_pb2_grpc.BackboneStub(bob._channel)
        answers = []
        for session_id in (session.id, "0" * len(session.id)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Evaluate(pb.EvaluateRequest(session_id=session_id, split="train", z=z), metadata=bob._metadata)
            answers.append((caught.value.code(), caught.value.details().replace(session_id, "ID")))
            with pytest.raises(grpc.RpcError) as caught:
                stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), metadata=bob._metadata)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert answers[0] == answers[1] and answers[0][0] == grpc.StatusCode.NOT_FOUND
        got = session.evaluate("train", population())  # bob changed nothing of alice's
        np.testing.assert_array_equal(got.ce_loss, want.ce_loss)
        session.close()


def test_a_tenants_session_and_example_limits(keyed):
    with connect(keyed, "alice") as alice:
        held = [alice.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA) for _ in range(2)]
        code, details = code_of(lambda: alice.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions" in details
        assert alice.usage().sessions_held == 2
        for session in held:
            session.close()
        code, details = code_of(lambda: alice.create_session({"train": TRAIN * 13}, TEMPLATE, VERBALIZER, DELTA))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_examples" in details and "50" in details
    with connect(keyed, "bob") as bob:  # bob has no limits of his own: the server's
        [bob.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA).close() for _ in range(3)]


def test_keys_file_mistakes_are_one_clear_error(tmp_path):
    path = tmp_path / "keys.json"
    good = {"name": "a", "key_sha256": hash_key("k"), "quota_calls": 10, "max_sessions": 1, "max_examples": 5}
    cases = {
        "not json": "not JSON",
        json.dumps({"tenants": []}): "at least one tenant",
        json.dumps({"tenants": [{**good, "key_sha256": "k"}]}): "not the key itself",
        json.dumps({"tenants": [good, {**good, "key_sha256": hash_key("j")}]}): "listed twice",
        json.dumps({"tenants": [{**good, "quota": 1}]}): "unknown field",
        json.dumps({"tenants": [{**good, "quota_calls": -1}]}): "integer >= 0",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(KeysFileError, match=message):
            load_tenants(path)
    path.write_text(json.dumps({"tenants": [good]}))
    assert load_tenants(path)[hash_key("k")] == Tenant("a", 10, 1, 5, hash_key("k"))


# ---- metering and quotas ---------------------------------------------------------------

def test_calls_are_metered_refused_past_the_quota_and_kept_across_restarts(tiny_llama, tmp_path):
    state = tmp_path / "state.sqlite"
    running = serve(tiny_llama, tenants=tenants(quota_calls=10), state_db=state)
    try:
        with connect(running, "alice") as alice:
            session = alice.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA)
            session.evaluate("train", population(4))
            session.evaluate("train", population(1), start=1, count=2)  # one candidate: one call, any range
            use = alice.usage()
            assert (use.calls_used, use.calls_left, use.calls_quota) == (5, 5, 10)
            assert use.examples_scored == 4 * 4 + 1 * 2 and use.sessions_held == 1
            session.evaluate("train", population(4))
            code, details = code_of(lambda: session.evaluate("train", population(2)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "quota_calls" in details and "9 of its 10" in details
            assert alice.usage().calls_used == 9  # a refused call costs nothing
            assert session.metered_calls == 9  # the client counts as the server meters
        with connect(running, "bob") as bob:  # one tenant's quota is not another's
            assert bob.usage().calls_used == 0 and bob.usage().calls_left == -1
    finally:
        running.stop(grace=0)
    again = serve(tiny_llama, tenants=tenants(quota_calls=10), state_db=state)
    try:
        with connect(again, "alice") as alice:
            assert alice.usage().calls_used == 9
    finally:
        again.stop(grace=0)


# ---- TLS -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1, made now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def test_tls_with_the_test_certificate(tiny_llama, certificate):
    cert, key = certificate
    running = serve(tiny_llama, tenants=tenants(), tls=(cert.read_bytes(), key.read_bytes()))
    try:
        with connect(running, "carol", tls_ca=str(cert)) as carol:
            session = carol.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA)
            assert session.evaluate("train", population()).ce_loss.shape == (4,)
        with BackboneClient(f"grpcs://{running.address}", api_key=KEYS["carol"], tls_ca=str(cert)) as carol:
            assert carol.usage().tenant == "carol"
        with BackboneClient(running.address, api_key=KEYS["carol"]) as plain:  # no TLS: no answer
            assert code_of(plain.get_info)[0] == grpc.StatusCode.UNAVAILABLE
        with BackboneClient(running.address, api_key=KEYS["carol"], tls=True) as untrusting:  # system roots
            assert code_of(untrusting.get_info)[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0)


# ---- what the switches protect ---------------------------------------------------------

def test_gradients_are_refused_before_the_request_is_read(keyed):
    with connect(keyed, "carol") as carol:
        stub = backbone_pb2_grpc.BackboneStub(carol._channel)
        for z in (pb.Tensor(shape=[2**32, 2**32]), pb.Tensor(data=b"xx", shape=[1])):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Gradient(pb.GradientRequest(session_id="nope", split="train", z=z), metadata=carol._metadata)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_logits_are_the_operators_choice_on_a_keyed_server(tiny_llama, keyed):
    with connect(keyed, "carol") as carol:
        assert not carol.get_info().logits_enabled
        session = carol.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA)
        code, details = code_of(lambda: session.evaluate("train", population(), return_logits=True))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "--allow-logits" in details
        assert session.evaluate("train", population()).logits is None
        session.close()
    running = serve(tiny_llama, tenants=tenants(), allow_logits=True)
    try:
        with connect(running, "carol") as carol:
            session = carol.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA)
            assert session.evaluate("train", population(), return_logits=True).logits.shape == (4, 4, 2)
    finally:
        running.stop(grace=0)


def test_get_info_tells_a_tenant_neither_the_hosts_memory_nor_its_paths(tiny_llama, keyed, tmp_path):
    with connect(keyed, "carol") as carol:
        info = carol.get_info()
    assert "GiB" not in info.memory_plan and "free" not in info.memory_plan
    assert info.limits["max_population"] == 4096 and info.limits["session_ttl_s"] == 30 * 60
    backbone = tiny_llama.__class__(**{**vars(tiny_llama), "name": str(tmp_path / "models" / "my-model")})
    running = serve(backbone, tenants=tenants())
    try:
        with connect(running, "carol") as carol:
            assert carol.get_info().model_name == "my-model"
    finally:
        running.stop(grace=0)


def test_an_open_server_binds_loopback_only_unless_told():
    import argparse

    from backbone_server.options import add_server_arguments
    from backbone_server.server import service_from_args

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    with pytest.raises(ValueError, match="--insecure-open"):
        service_from_args(parser.parse_args(["--host", "0.0.0.0"]))
    assert not service_from_args(parser.parse_args(["--host", "0.0.0.0", "--insecure-open"])).tenants.keyed
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("")


# ---- limits and bad requests -----------------------------------------------------------

def test_long_inputs_are_not_echoed_back(keyed):
    with connect(keyed, "carol") as carol:
        stub = backbone_pb2_grpc.BackboneStub(carol._channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Evaluate(pb.EvaluateRequest(session_id="x" * 2**20, split="y" * 2**20,
                                             z=array_to_tensor(population())), metadata=carol._metadata)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and len(caught.value.details()) < 300


def test_undecodable_requests_are_invalid_argument_without_a_traceback(keyed, caplog):
    with connect(keyed, "carol") as carol:
        raw = carol._channel.unary_unary("/blackbox.v1.Backbone/Evaluate")
        with caplog.at_level(logging.INFO):
            for body in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f"):
                with pytest.raises(grpc.RpcError) as caught:
                    raw(body, metadata=carol._metadata, timeout=10)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info]


def test_a_call_past_the_rows_bound_is_refused_with_the_bound(tiny_llama):
    running = serve(tiny_llama, limits=Limits(max_rows_per_call=10))
    try:
        with connect(running) as client:
            session = client.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA)
            code, details = code_of(lambda: session.evaluate("train", population(3)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "12 rows" in details and "10" in details
            assert session.evaluate("train", population(3), count=3).num_examples == 3
    finally:
        running.stop(grace=0)


# ---- sessions that clean up after themselves --------------------------------------------

def test_idle_sessions_expire_free_their_memory_and_a_client_rides_it_out(tiny_llama):
    running = serve(tiny_llama, limits=Limits(session_ttl_s=0.5))
    try:
        engine = running.servicer.engine
        with connect(running) as client:
            session = client.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA)
            want = session.evaluate("train", population())
            first = session.id
            assert engine.batcher.ranges.session_bytes(first) > 0
            deadline = time.monotonic() + 10
            while len(engine.sessions) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(engine.sessions) == 0 and engine.sessions.expired == 1  # closed with no call to do it
            assert engine.batcher.ranges.session_bytes(first) == 0
            got = session.evaluate("train", population())  # NOT_FOUND: re-created, repeated
            np.testing.assert_array_equal(got.ce_loss, want.ce_loss)
            assert session.id != first and session.recoveries == 1
    finally:
        running.stop(grace=0)


def test_a_session_in_use_does_not_expire_under_its_caller():
    from backbone_server.sessions import SessionRegistry, SessionState

    registry = SessionRegistry(4, ttl_s=0.01)
    tenant = Tenant("t")
    session = SessionState("s", None, None, None, {}, False, 0)
    registry.add(session, tenant)
    with registry.held("s", tenant):
        time.sleep(0.05)
        assert registry.expire() == 0
    time.sleep(0.05)
    assert registry.expire() == 1 and len(registry) == 0


def test_the_range_cache_stays_within_its_bounds_and_counts_evictions():
    import torch

    from backbone_server.batching import Bucket, RangeCache

    def bucket(size):
        ids = torch.zeros(size // 8, dtype=torch.int64)
        return Bucket([0], ids[:1], False, None, None, ids, ids[:0], ids[:0], None)

    cache = RangeCache(limit=3000, session_limit=2000)
    for key in range(3):
        cache.put("a", key, [bucket(800)])
    assert cache.session_bytes("a") <= 2000 and cache.evictions == 1 and cache.get("a", 0) is None
    cache.put("b", 0, [bucket(800)])
    cache.put("b", 1, [bucket(800)])
    assert cache.bytes <= 3000 and cache.evictions == 2 and cache.get("a", 1) is None  # the oldest went
    cache.drop_session("b")
    assert cache.session_bytes("b") == 0 and cache.evictions == 2


# ---- one tenant does not hold up another -----------------------------------------------

def test_tenants_take_turns_step_by_step():
    from backbone_server.fairness import FairTurns

    turns = FairTurns()
    order: list[str] = []
    started = threading.Event()

    def work(tenant, steps):
        for _ in range(steps):
            with turns.turn(tenant):
                order.append(tenant)
                started.set()
                time.sleep(0.01)

    big = threading.Thread(target=work, args=("big", 30))
    big.start()
    started.wait()
    time.sleep(0.03)
    small = threading.Thread(target=work, args=("small", 3))
    small.start()
    small.join()
    big.join()
    first_small = order.index("small")
    tail = "".join("s" if who == "small" else "b" for who in order[first_small:first_small + 6])
    assert tail == "sbsbsb", order  # the small tenant's steps never wait behind more than one big step


def test_a_caller_gone_stops_its_request_between_steps(tiny_llama):
    from backbone_server.engine import Engine
    from backbone_server.errors import Cancelled

    engine = Engine(tiny_llama)
    session = engine.create_session({"train": [(e.text_a, "", e.label) for e in TRAIN]}, TEMPLATE, VERBALIZER,
                                    _config(DELTA))
    with pytest.raises(Cancelled):
        engine.evaluate(session.id, "train", population(), cancelled=lambda: True)
    assert engine.store.use("open").calls == 0


def _config(delta: DeltaSpec):
    from backbone_server.deltas import DeltaConfig

    return DeltaConfig.from_message(delta.to_message())


def test_deep_prompts_are_built_in_turn_beside_other_tenants_evaluates(tiny_llama):
    """Defect 1: building a deep prompt runs the model; beside another client's LoRA
    Evaluate it used to run with that client's hooks installed."""
    running = serve(tiny_llama)
    deep = DeltaSpec(kind="deep-prompt", prompt_length=5, intrinsic_dim=4)
    lora = DeltaSpec(kind="lora", prompt_length=0, intrinsic_dim=8)
    try:
        with connect(running) as client:
            alone = client.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, deep)
            want = alone.evaluate("train", population()).ce_loss
            alone.close()
            busy = client.create_session({"train": TRAIN * 8}, TEMPLATE, VERBALIZER, lora)
            stop = threading.Event()

            def evaluate_lora():
                z = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
                while not stop.is_set():
                    busy.evaluate("train", z)

            workers = [threading.Thread(target=evaluate_lora) for _ in range(2)]
            for worker in workers:
                worker.start()
            try:
                for _ in range(8):
                    session = client.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, deep)
                    np.testing.assert_array_equal(session.evaluate("train", population()).ce_loss, want)
                    session.close()
            finally:
                stop.set()
                for worker in workers:
                    worker.join()
    finally:
        running.stop(grace=0)


# ---- metrics ---------------------------------------------------------------------------

def test_prometheus_metrics(tiny_llama):
    running = serve(tiny_llama, tenants=tenants(), metrics_port=0)
    try:
        with connect(running, "alice") as alice:
            session = alice.create_session({"train": TRAIN}, TEMPLATE, VERBALIZER, DELTA)
            session.evaluate("train", population(4))
            code_of(lambda: session.evaluate("nope", population(4)))
        with BackboneClient(running.address, api_key="wrong") as stranger:
            code_of(stranger.get_info)
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        running.stop(grace=0)
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines['blackbox_requests_total{code="OK",method="Evaluate"}'] == 1
    assert lines['blackbox_requests_total{code="NOT_FOUND",method="Evaluate"}'] == 1
    assert lines['blackbox_requests_total{code="UNAUTHENTICATED",method="GetInfo"}'] == 1
    assert lines['blackbox_request_seconds_count{method="Evaluate"}'] == 2
    assert lines['blackbox_tenant_calls_total{tenant="alice"}'] == 4
    assert lines['blackbox_sessions{tenant="alice"}'] == 1
    assert lines["blackbox_forward_tokens_total"] > 0 and lines["blackbox_batch_occupancy_count"] >= 1
    assert 'blackbox_cache_evictions_total{cache="ranges"}' in lines
    assert 'blackbox_cache_bytes{cache="prefix_states"}' in lines
