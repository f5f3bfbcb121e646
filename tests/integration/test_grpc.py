"""A real server on a free port: the service contract, error statuses, and a short run."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from backbone_server.server import create_server
from backbone_server.tiny import MAX_LENGTH
from blackbox.client import BackboneClient, BackboneError, DeltaSpec
from blackbox.tasks import Example
from blackbox.v1 import backbone_pb2 as pb
from blackbox.v1 import backbone_pb2_grpc

TRAIN = [Example("a great film", None, 1), Example("a bad film", None, 0), Example("very good", None, 1)]
TEMPLATE = "{text_a} It was {mask}"


@pytest.fixture(scope="module")
def server():
    running = create_server("tiny-llama", "127.0.0.1:0", device="cpu", dtype="float32")
    running.wait_ready(timeout=120)
    yield running
    running.stop(grace=0)


@pytest.fixture
def client(server):
    with BackboneClient(server.address) as client:
        client.wait_ready(timeout=30)
        yield client


@pytest.fixture
def session(client):
    session = client.create_session({"train": TRAIN}, TEMPLATE, ["bad", "great"], DeltaSpec(prompt_length=3, intrinsic_dim=4))
    yield session


def test_get_info_describes_the_model(client):
    info = client.get_info()
    assert info.model_name == "tiny-llama"
    assert info.architecture == "causal"
    assert info.hidden_size == 64 and info.num_layers == 2
    assert {"prompt", "deep-prompt", "lora", "adapter", "bias"} <= set(info.delta_kinds)
    assert [form.split(":")[0] for form in info.delta_forms][:3] == ["KIND+KIND[+KIND...]", "unipelt", "adamix[M]"]
    assert info.max_length == MAX_LENGTH
    assert info.max_batch_tokens > 0 and str(info.max_batch_tokens) in info.memory_plan


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server.address)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="blackbox.v1.Backbone"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "blackbox.v1.Backbone" in names
    channel.close()


def test_evaluate_round_trip(session):
    assert session.split_sizes == {"train": 3}
    assert session.prefix_reuse  # the BOS token precedes the prompt
    z = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    scores = session.evaluate("train", z, return_logits=True)
    assert scores.ce_loss.shape == scores.hinge_loss.shape == scores.accuracy.shape == (5,)
    assert scores.logits.shape == (5, 3, 2)
    assert scores.num_examples == 3
    assert session.evaluate("train", z).logits is None
    single = session.evaluate("train", z[2])
    np.testing.assert_allclose(single.ce_loss[0], scores.ce_loss[2], atol=1e-5)


def raw_evaluate(server, **fields):
    channel = grpc.insecure_channel(server.address)
    try:
        return backbone_pb2_grpc.BackboneStub(channel).Evaluate(pb.EvaluateRequest(**fields))
    finally:
        channel.close()


def test_error_statuses(server, session, client):
    def code_of(call):
        with pytest.raises(BackboneError) as caught:
            call()
        return caught.value.code, str(caught.value)

    code, message = code_of(lambda: session.evaluate("train", np.full((2, 4), np.nan)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in message
    code, message = code_of(lambda: session.evaluate("train", np.zeros((2, 9))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shape" in message
    code, _ = code_of(lambda: session.evaluate("dev", np.zeros((1, 4))))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(lambda: client.create_session({"train": []}, TEMPLATE, ["bad", "great"], DeltaSpec(prompt_length=3, intrinsic_dim=4)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    long_text = [Example("good " * (MAX_LENGTH + 100), None, 1)]
    code, message = code_of(lambda: client.create_session({"train": long_text}, TEMPLATE, ["bad", "great"],
                                                          DeltaSpec(prompt_length=3, intrinsic_dim=4)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "truncate" in message
    session.close()
    code, message = code_of(lambda: session.evaluate("train", np.zeros((1, 4))))
    assert code == grpc.StatusCode.NOT_FOUND and "no session" in message


def test_malformed_tensor_is_invalid_argument_and_server_survives(server, client, session):
    bad = pb.Tensor(data=b"\x00" * 7, shape=[2, 4], dtype="float32")
    with pytest.raises(grpc.RpcError) as caught:
        raw_evaluate(server, session_id=session.id, split="train", z=bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.get_info().model_name == "tiny-llama"


def test_unavailable_until_the_model_is_loaded():
    from backbone_server.servicer import BackboneServicer
    from backbone_server.errors import Unavailable

    with pytest.raises(Unavailable):
        BackboneServicer().GetInfo(pb.GetInfoRequest(), None)


def test_loading_an_unknown_model_fails_clearly():
    running = create_server("no-such-model", "127.0.0.1:0")
    try:
        with pytest.raises(Exception, match="unknown model 'no-such-model'"):
            running.wait_ready(timeout=60)
    finally:
        running.stop(grace=0)


def test_tune_a_few_generations_on_real_data(server, tmp_path):
    from blackbox.tune_config import TuneConfig
    from blackbox.tuner import run_tune

    config = TuneConfig(task="sst2", seed=13, budget=24, popsize=6, dim=8, prompt_length=3,
                        placement="after", out=str(tmp_path / "run"))
    with BackboneClient(server.address) as client:
        result = run_tune(config, client, show_progress=False)
    assert result["api_calls"] == 24 and result["generations"] == 4
    assert result["test_examples"] == 872
    for key in ("task", "seed", "model", "delta", "optimizer", "dim", "popsize", "budget", "api_calls",
                "generations", "best_dev_acc", "test_acc", "zero_shot_test_acc", "wall_s"):
        assert key in result
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["test_acc"] == result["test_acc"]
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["api_calls"] for line in lines] == [6, 12, 18, 24]
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000
    assert np.load(tmp_path / "run" / "best_z.npy").shape == (8,)


def test_gradients_are_refused_by_a_black_box_server(client, session):
    assert not client.get_info().gradients_enabled
    with pytest.raises(BackboneError) as caught:
        session.gradient("train", np.zeros((1, 4)))
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED and "--allow-gradients" in str(caught.value)
    assert session.evaluate("train", np.zeros((1, 4))).num_examples == 3  # nothing else changed


@pytest.fixture(scope="module")
def white_box_server():
    running = create_server("tiny-llama", "127.0.0.1:0", device="cpu", dtype="float32", allow_gradients=True)
    running.wait_ready(timeout=120)
    yield running
    running.stop(grace=0)


def test_gradient_round_trip(white_box_server):
    with BackboneClient(white_box_server.address) as client:
        assert client.get_info().gradients_enabled
        session = client.create_session({"train": TRAIN}, TEMPLATE, ["bad", "great"],
                                        DeltaSpec(prompt_length=3, intrinsic_dim=4))
        z = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
        result = session.gradient("train", z)
        assert result.grad.shape == (2, 4) and result.num_examples == 3 and np.abs(result.grad).sum() > 0
        np.testing.assert_allclose(result.loss, session.evaluate("train", z).ce_loss, atol=1e-6)
        hinge = session.gradient("train", z, loss="hinge")
        np.testing.assert_allclose(hinge.loss, session.evaluate("train", z).hinge_loss, atol=1e-6)
        with pytest.raises(BackboneError, match="unknown loss"):
            session.gradient("train", z, loss="mse")


def test_tune_with_gradients_counts_one_call_per_step(white_box_server, server, tmp_path):
    from blackbox.tune_config import TuneConfig
    from blackbox.tuner import run_tune

    config = TuneConfig(task="sst2", seed=13, budget=5, popsize=6, dim=8, prompt_length=3,
                        placement="after", optimizer="gradient", out=str(tmp_path / "run"))
    with BackboneClient(white_box_server.address) as client:
        result = run_tune(config, client, show_progress=False)
    assert result["api_calls"] == 5 and result["generations"] == 5 and result["popsize"] == 1
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["api_calls"] for line in lines] == [1, 2, 3, 4, 5]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]  # descent on the train loss

    refused = TuneConfig(**{**config.__dict__, "out": str(tmp_path / "refused")})
    with BackboneClient(server.address) as client, pytest.raises(ValueError, match="--allow-gradients"):
        run_tune(refused, client, show_progress=False)
    assert not (tmp_path / "refused").exists()


def subspace_bytes(tmp_path, size, k=2) -> bytes:
    from backbone_server.subspace import Subspace, save_subspace

    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((size, k)))[0].T.astype(np.float32)
    return save_subspace(Subspace(basis, np.ones(k, np.float32), {"kind": "prompt"}), tmp_path / "s.npz").read_bytes()


def test_subspace_uploads_are_refused_unless_enabled(client, tmp_path):
    with pytest.raises(BackboneError) as caught:
        client.upload_subspace("mine", subspace_bytes(tmp_path, 3 * 64))
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED and "--allow-subspace-uploads" in str(caught.value)
    assert not any(kind.startswith("subspace:") for kind in client.get_info().projection_kinds)


def test_an_uploaded_subspace_serves_sessions_within_its_bounds(tmp_path):
    data = subspace_bytes(tmp_path, 3 * 64)  # a 3-vector soft prompt of the tiny model's 64 dimensions
    running = create_server("tiny-llama", "127.0.0.1:0", device="cpu", dtype="float32", allow_subspace_uploads=True,
                            max_subspace_mb=(len(data) + 10) / 2 ** 20)
    running.wait_ready(timeout=120)
    try:
        with BackboneClient(running.address) as client:
            hosted = client.upload_subspace("mine", data)
            assert (hosted.projection, hosted.dim, hosted.delta_size) == ("subspace:mine", 2, 3 * 64)
            assert "subspace:mine" in client.get_info().projection_kinds
            session = client.create_session({"train": TRAIN}, TEMPLATE, ["bad", "great"],
                                            DeltaSpec(prompt_length=3, intrinsic_dim=2, projection="subspace:mine"))
            assert session.evaluate("train", np.zeros((2, 2))).num_examples == 3

            def code_of(name, payload):
                with pytest.raises(BackboneError) as caught:
                    client.upload_subspace(name, payload)
                return caught.value.code

            assert code_of("mine", data) == grpc.StatusCode.INVALID_ARGUMENT  # the name is taken
            assert code_of("big", data + b"x" * 20) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert code_of("junk", b"not a subspace") == grpc.StatusCode.INVALID_ARGUMENT
            assert code_of("bad name", data) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        running.stop(grace=0)
