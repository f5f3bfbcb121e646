"""Tuned deltas kept on the server and used without weights (issue 16): SaveDelta,
ListDeltas, DeleteDelta, Predict and PredictStream, per tenant, across restarts."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from backbone_server.server import Service, create_server
from backbone_server.tenants import Tenant, TenantDirectory
from blackbox.client import BackboneClient, BackboneError, DeltaSpec, SavedDelta
from blackbox.tasks import Example
from blackbox.v1 import backbone_pb2 as pb
from blackbox.v1.auth import hash_key

TRAIN = [Example("a great film", None, 1), Example("a bad film", None, 0), Example("very good", None, 1),
         Example("not good at all", None, 0)]
TEXTS = [("a great film", None), ("not good at all", None), ("the story was fine", None)]
TEMPLATE = "{text_a} It was {mask}"
VERBALIZER = ("bad", "great")
DELTA = DeltaSpec(prompt_length=3, intrinsic_dim=4)
KEYS = {"alice": "bbx_alice", "bob": "bbx_bob"}


def serve(backbone, state_db=None):
    tenants = TenantDirectory({hash_key(k): Tenant(n, key_sha256=hash_key(k)) for n, k in KEYS.items()})
    running = create_server("tiny-llama", "127.0.0.1:0", backbone=backbone,
                            service=Service(tenants=tenants, allow_logits=True, state_db=state_db))
    running.wait_ready(timeout=60)
    return running


def connect(server, tenant):
    client = BackboneClient(server.address, api_key=KEYS[tenant])
    client.wait_ready(timeout=30)
    return client


def saved(name="sentiment", z=None, **fields):
    z = np.random.default_rng(3).normal(size=DELTA.intrinsic_dim).astype(np.float32) if z is None else z
    return SavedDelta(name, DELTA, TEMPLATE, VERBALIZER, z, **fields)


@pytest.fixture
def server(tiny_llama, tmp_path):
    running = serve(tiny_llama, tmp_path / "state.sqlite")
    yield running
    running.stop(grace=0)


def code_of(call):
    with pytest.raises(BackboneError) as caught:
        call()
    return caught.value.code, caught.value.details


def test_predict_on_a_stored_delta_equals_evaluates_logits(server):
    with connect(server, "alice") as alice:
        delta = saved()
        assert alice.save_delta(delta) == DELTA.intrinsic_dim
        prediction = alice.predict(TEXTS, name="sentiment")
        session = alice.create_session({"x": [Example(a, b, 0) for a, b in TEXTS]}, TEMPLATE, VERBALIZER, DELTA)
        logits = session.evaluate("x", delta.z, return_logits=True).logits[0].astype(np.float64)
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(prediction.probabilities, want, atol=1e-6)
    np.testing.assert_array_equal(prediction.labels, want.argmax(axis=1))
    assert prediction.label_words == VERBALIZER
    with connect(server, "alice") as alice:  # given whole, with a label bias
        biased = alice.predict(TEXTS, delta=saved(label_bias=(5.0, -5.0)))
    assert (biased.labels == 0).all() and not np.allclose(biased.probabilities, prediction.probabilities)


def test_a_tenant_cannot_list_use_or_delete_anothers_deltas(server):
    with connect(server, "alice") as alice, connect(server, "bob") as bob:
        alice.save_delta(saved())
        assert [d.name for d in alice.list_deltas()] == ["sentiment"]
        listed = alice.list_deltas()[0]
        assert listed.z is None and listed.z_dim == DELTA.intrinsic_dim and listed.model_name == "tiny-llama"
        assert bob.list_deltas() == []
        missing = code_of(lambda: bob.predict(TEXTS, name="nothing"))
        assert code_of(lambda: bob.predict(TEXTS, name="sentiment")) == (missing[0], missing[1].replace(
            "nothing", "sentiment"))
        assert code_of(lambda: bob.delete_delta("sentiment"))[0] == grpc.StatusCode.NOT_FOUND
        bob.save_delta(saved(z=np.zeros(4, np.float32)))  # the same name is bob's own
        alice_before = alice.predict(TEXTS, name="sentiment").probabilities
        bob.delete_delta("sentiment")
        np.testing.assert_array_equal(alice.predict(TEXTS, name="sentiment").probabilities, alice_before)


def test_a_stored_delta_survives_a_restart(tiny_llama, tmp_path):
    state = tmp_path / "state.sqlite"
    first = serve(tiny_llama, state)
    try:
        with connect(first, "alice") as alice:
            alice.save_delta(saved(notes={"task": "sst2"}))
            want = alice.predict(TEXTS, name="sentiment").probabilities
    finally:
        first.stop(grace=0)
    again = serve(tiny_llama, state)
    try:
        with connect(again, "alice") as alice:
            (listed,) = alice.list_deltas()
            assert listed.notes == {"task": "sst2"}
            np.testing.assert_array_equal(alice.predict(TEXTS, name="sentiment").probabilities, want)
    finally:
        again.stop(grace=0)


def test_saving_refuses_what_this_model_cannot_use_and_keeps_names_unless_told(server):
    with connect(server, "alice") as alice:
        no_mask = SavedDelta("x", DELTA, "{text_a}", VERBALIZER, np.zeros(4, np.float32))
        for bad, message in ((saved(name="no spaces"), "letters, digits"),
                             (saved(z=np.zeros(5, np.float32)), "z must be 4"),
                             (no_mask, "mask")):
            code, details = code_of(lambda: alice.save_delta(bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
        assert alice.list_deltas() == []
        alice.save_delta(saved())
        code, details = code_of(lambda: alice.save_delta(saved(z=np.zeros(4, np.float32))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "overwrite" in details
        alice.save_delta(saved(z=np.zeros(4, np.float32)), overwrite=True)
        np.testing.assert_array_equal(alice.predict(TEXTS, name="sentiment").probabilities,
                                      alice.predict(TEXTS, delta=saved(z=np.zeros(4, np.float32))).probabilities)
        code, details = code_of(lambda: alice.predict(TEXTS, delta=saved(model_name="another-model")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "another-model" in details
        assert code_of(lambda: alice.predict([], name="sentiment"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_predict_is_metered_as_one_call(server):
    with connect(server, "alice") as alice:
        alice.save_delta(saved())
        before = alice.usage().calls_used
        alice.predict(TEXTS, name="sentiment")
        use = alice.usage()
    assert use.calls_used - before == 1


def test_generate_under_a_stored_delta_at_z_zero_is_the_plain_models_greedy_output(server, tiny_llama):
    import torch

    lora = DeltaSpec(kind="lora", prompt_length=0, intrinsic_dim=4)
    with connect(server, "alice") as alice:
        alice.save_delta(SavedDelta("plain", lora, TEMPLATE, VERBALIZER, np.zeros(4, np.float32)))
        (got,) = alice.generate([("a great film", None)], name="plain", max_new_tokens=6)
        before = alice.usage().calls_used
        two = alice.generate([("a great film", None), ("a bad one", None)], name="plain", max_new_tokens=6)
        assert alice.usage().calls_used - before == 2 and two[0] == got  # one call per text; batching changes nothing
        code, details = code_of(lambda: alice.generate([("x", None)], name="plain", max_new_tokens=5000))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "1024" in details
    engine = server.servicer.engine
    encoder_input = engine.transient_session({"x": [("a great film", "", 0)]}, TEMPLATE, list(VERBALIZER),
                                             _config(lora), False, Tenant("alice")).splits["x"][0]
    ids = torch.tensor([encoder_input.before + encoder_input.after[:encoder_input.read - len(encoder_input.before) + 1]])
    with torch.inference_mode():
        want = tiny_llama.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                         pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert list(got.tokens) == want[:len(got.tokens)] and got.finish_reason in ("length", "eos")


def _config(delta):
    from backbone_server.deltas import DeltaConfig

    return DeltaConfig.from_message(delta.to_message())


# ---- PredictStream: large inputs in one streamed call ----------------------------------------


def test_a_predict_stream_answers_each_slice_as_predict_does(server):
    slices = [TEXTS, TEXTS[:1], [("a third slice", None), ("and more", None)]]
    with connect(server, "alice") as alice:
        alice.save_delta(saved())
        before = alice.usage().calls_used
        streamed = list(alice.predict_stream(slices, name="sentiment"))
        after = alice.usage().calls_used
        alone = [alice.predict(batch, name="sentiment") for batch in slices]
        given = list(alice.predict_stream(slices, delta=saved()))
    assert after - before == len(slices)  # one call per slice
    for got, want, whole in zip(streamed, alone, given):
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
        np.testing.assert_allclose(whole.probabilities, want.probabilities, atol=1e-6)
        assert got.label_words == VERBALIZER
    assert [len(p.labels) for p in streamed] == [len(s) for s in slices]


def test_a_predict_stream_refuses_what_predict_refuses_and_a_delta_after_the_first(server):
    with connect(server, "alice") as alice, connect(server, "bob") as bob:
        alice.save_delta(saved())
        assert code_of(lambda: list(bob.predict_stream([TEXTS], name="sentiment")))[0] == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: list(alice.predict_stream([TEXTS, []], name="sentiment")))[0] == \
            grpc.StatusCode.INVALID_ARGUMENT
        got = []

        def two_deltas():
            first = pb.PredictRequest(delta_name="sentiment", texts=[pb.Example(text_a="good")])
            second = pb.PredictRequest(delta_name="sentiment", texts=[pb.Example(text_a="bad")])
            for response in alice._stub.PredictStream(iter([first, second]), metadata=alice._metadata):
                got.append(response)

        with pytest.raises(grpc.RpcError) as caught:
            two_deltas()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first request" in caught.value.details()
        assert len(got) == 1  # the first slice was answered before the second was refused
        code, _ = code_of(lambda: list(BackboneClient(server.address).predict_stream([TEXTS], name="sentiment")))
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_an_undecodable_request_in_a_stream_is_invalid_argument(server):
    channel = grpc.insecure_channel(server.address)
    method = channel.stream_stream("/blackbox.v1.Backbone/PredictStream", request_serializer=lambda raw: raw,
                                   response_deserializer=lambda raw: raw)
    with pytest.raises(grpc.RpcError) as caught:
        list(method(iter([b"\xff\xff\xff"]), metadata=[("authorization", f"Bearer {KEYS['alice']}")]))
    channel.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
