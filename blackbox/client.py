"""The client side of the Backbone service: sessions, populations in, scores out.

gRPC statuses become `BackboneError`s whose message says what went wrong and what the
server said, so a CLI user never sees a raw RpcError.

Every call carries the API key (when there is one), a deadline, and rides on keepalive
pings, so a server that stops answering fails the call instead of freezing it. A session
holds its task, so that when its server restarts (UNAVAILABLE, or NOT_FOUND for the
session) it waits for the server to serve again, re-creates itself and repeats the call:
scores depend only on z, so the caller sees exactly what an unfaulted server answers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blackbox.v1 import backbone_pb2 as pb
from blackbox.v1 import backbone_pb2_grpc
from blackbox.v1.auth import ENVIRONMENT_VARIABLE, key_metadata
from blackbox.v1.channel import client_options
from blackbox.v1.delta_spec import DeltaForm, DeltaSpec, KindInfo
from blackbox.v1.messages import message_fields
from blackbox.v1.wire import array_to_tensor, tensor_to_array

log = logging.getLogger(__name__)

DEFAULT_CALL_TIMEOUT_S = 600.0  # one call's deadline: a generation or a slice of a test split
DEFAULT_RECOVER_S = 120.0  # how long a session waits for its restarted server
TLS_SCHEME = "grpcs://"
PLAIN_SCHEME = "grpc://"

__all__ = ["BackboneClient", "BackboneError", "DeltaForm", "DeltaSpec", "Generation", "Gradients", "KindInfo",
           "ModelInfo", "Prediction", "SavedDelta", "Scores", "Session", "Usage"]


@dataclass
class SavedDelta:
    """A tuned delta as the server stores it (SaveDelta): z and what it takes to use it."""

    name: str
    delta: DeltaSpec
    template: str
    verbalizer: tuple[str, ...]
    z: np.ndarray | None  # (z_dim,); None in a listing
    truncate: bool = False
    label_bias: tuple[float, ...] = ()  # per-class offsets added to the logits
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    model_name: str = ""  # set by the server
    saved_unix: float = 0.0  # set by the server
    z_dim: int = 0

    def to_message(self) -> pb.StoredDelta:
        return pb.StoredDelta(name=self.name, delta=self.delta.to_message(), template=self.template,
                              verbalizer=list(self.verbalizer),
                              z=array_to_tensor(np.asarray(self.z, np.float32)) if self.z is not None else None,
                              truncate=self.truncate, label_bias=list(self.label_bias), notes=self.notes,
                              model_name=self.model_name, saved_unix=self.saved_unix)

    @classmethod
    def from_message(cls, message: pb.StoredDelta) -> "SavedDelta":
        z = tensor_to_array(message.z) if message.z.data else None
        return cls(message.name, DeltaSpec.from_message(message.delta), message.template, tuple(message.verbalizer),
                   z, message.truncate, tuple(message.label_bias), dict(message.notes), message.model_name,
                   message.saved_unix, int(message.z.shape[0]) if len(message.z.shape) else 0)


@dataclass
class Prediction:
    labels: np.ndarray  # (N,)
    probabilities: np.ndarray | None  # (N, C); None from a server that keeps logits back (--allow-logits)
    label_words: tuple[str, ...]


@dataclass
class Generation:
    text: str
    tokens: tuple[int, ...]
    finish_reason: str  # "eos", "length" or "stop"


class BackboneError(RuntimeError):
    """A failed call to a backbone server, with the gRPC status name and its details."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str, method: str):
        self.code = code
        self.details = details
        super().__init__(f"{method} on {address} failed with {code.name}: {details}")


@dataclass
class Scores:
    ce_loss: np.ndarray  # (P,)
    hinge_loss: np.ndarray  # (P,)
    accuracy: np.ndarray  # (P,)
    logits: np.ndarray | None  # (P, N, C) when asked for
    num_examples: int
    server_ms: float
    # (P, C) per-class offsets the client fitted to these logits (a calibrated objective).
    label_bias: np.ndarray | None = None


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    max_length: int
    delta_kinds: tuple[str, ...]
    projection_kinds: tuple[str, ...]
    device: str
    dtype: str
    max_batch_tokens: int
    gradients_enabled: bool
    memory_plan: str
    delta_forms: tuple[str, ...] = ()
    kinds: dict[str, KindInfo] = dataclasses.field(default_factory=dict)  # what each of delta_kinds takes
    cache_report: str = ""
    logits_enabled: bool = True
    keyed: bool = False
    limits: dict[str, float] = dataclasses.field(default_factory=dict)  # Limits: what one request may ask


@dataclass(frozen=True)
class Usage:
    """A tenant's metered use (one API call: one candidate scored in one request)."""

    tenant: str
    calls_used: int
    calls_quota: int  # 0: no quota
    calls_left: int  # -1: no quota
    examples_scored: int
    sessions_held: int
    max_sessions: int
    max_examples: int


@dataclass
class Gradients:
    loss: np.ndarray  # (P,)
    accuracy: np.ndarray  # (P,)
    grad: np.ndarray  # (P, d): d loss / d z
    num_examples: int
    server_ms: float


def parse_address(address: str, tls: bool = False) -> tuple[str, bool]:
    """HOST:PORT and whether to use TLS: a grpcs:// address (or `tls`) does."""
    if address.startswith(TLS_SCHEME):
        return address[len(TLS_SCHEME):], True
    if address.startswith(PLAIN_SCHEME):
        if tls:
            raise ValueError(f"{address} asks for a plain connection, and TLS was asked for too")
        return address[len(PLAIN_SCHEME):], False
    return address, tls


class BackboneClient:
    """A connection to one backbone server.

    `api_key`: the tenant's key (default: $BLACKBOX_API_KEY). TLS: a grpcs:// address, or
    `tls`, or `tls_ca` (a PEM file of the certificate authority to trust instead of the
    system's). `call_timeout`: each call's deadline. `recover_s`: how long a session waits
    for its server to come back after a restart (0: it fails at once, as replicas do).
    `on_event` hears what a session does meanwhile, in words (default: the log).
    """

    def __init__(self, address: str, api_key: str | None = None, tls: bool = False, tls_ca: str | None = None,
                 call_timeout: float = DEFAULT_CALL_TIMEOUT_S, recover_s: float = DEFAULT_RECOVER_S,
                 on_event: Callable[[str], None] | None = None):
        target, secure = parse_address(address, tls or bool(tls_ca))
        self.address = address
        self.api_key = api_key if api_key is not None else os.environ.get(ENVIRONMENT_VARIABLE) or None
        self.call_timeout = call_timeout
        self.recover_s = recover_s
        self.on_event = on_event or log.warning
        if secure:
            root = None
            if tls_ca:
                try:
                    with open(tls_ca, "rb") as handle:
                        root = handle.read()
                except OSError as error:
                    raise ValueError(f"cannot read the TLS certificate authority {tls_ca}: {error.strerror}") from None
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root),
                                                options=client_options())
        else:
            self._channel = grpc.insecure_channel(target, options=client_options())
        self._metadata = key_metadata(self.api_key)
        self._stub = backbone_pb2_grpc.BackboneStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.call_timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise BackboneError(error.code(), error.details(), self.address, method) from None

    def wait_ready(self, timeout: float = 30.0, poll: float = 0.5, on_wait: Callable[[str], None] | None = None) -> None:
        """Waits until the server reports SERVING (it may still be loading its model).

        `on_wait` hears, once per change, what the server answers meanwhile ("no answer
        yet: UNAVAILABLE", "NOT_SERVING"), so a person sees what the wait is for.
        """
        deadline = time.monotonic() + timeout
        last = heard = ""
        while True:
            try:
                status = self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                            timeout=max(0.1, min(5.0, deadline - time.monotonic()))).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as error:
                last = f"no answer yet: {error.code().name}"
            if on_wait is not None and last != heard:
                on_wait(last)
                heard = last
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(poll, left))
        raise TimeoutError(f"no backbone server ready at {self.address} after {timeout:g} s ({last}); "
                           "check the address and that `blackbox serve` runs there, or raise --timeout")

    def serving(self, timeout: float = 1.0) -> bool:
        """One health check: whether the server answers SERVING now."""
        try:
            status = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status
        except grpc.RpcError:
            return False
        return status == health_pb2.HealthCheckResponse.SERVING

    def upload_subspace(self, name: str, data: bytes) -> pb.UploadSubspaceResponse:
        """Asks the server to host a subspace file's bytes under `name` (if it accepts uploads)."""
        return self._call("UploadSubspace", pb.UploadSubspaceRequest(name=name, data=data), timeout=120)

    def get_info(self) -> ModelInfo:
        info = self._call("GetInfo", pb.GetInfoRequest(), timeout=30)
        limits = {field.name: value for field, value in info.limits.ListFields()} if info.HasField("limits") else {}
        return ModelInfo(**message_fields(info, ModelInfo, exclude=("kinds", "limits")),
                         kinds={kind.name: KindInfo.from_message(kind) for kind in info.kinds}, limits=limits)

    def usage(self) -> Usage:
        """The calling tenant's metered use and limits."""
        response = self._call("Usage", pb.UsageRequest(), timeout=30)
        return Usage(**message_fields(response, Usage))

    def create_session(self, splits: dict[str, Sequence], template: str, verbalizer: Sequence[str],
                       delta: DeltaSpec, truncate: bool = False) -> "Session":
        """`splits` maps a name to examples with text_a, text_b (or None) and label."""
        return Session(self, splits, template, verbalizer, delta, truncate)

    def _create_session(self, splits: dict[str, Sequence], template: str, verbalizer: Sequence[str],
                        delta: DeltaSpec, truncate: bool) -> pb.CreateSessionResponse:
        request = pb.CreateSessionRequest(
            splits=[
                pb.Split(name=name, examples=[
                    pb.Example(text_a=e.text_a, text_b=e.text_b or "", label=e.label) for e in examples
                ])
                for name, examples in splits.items()
            ],
            template=template,
            verbalizer=list(verbalizer),
            delta=delta.to_message(),
            truncate=truncate,
        )
        return self._call("CreateSession", request)

    # ---- stored deltas ----------------------------------------------------------------

    def save_delta(self, saved: SavedDelta, overwrite: bool = False) -> int:
        """Stores a tuned delta on the server under saved.name; returns its z_dim."""
        return self._call("SaveDelta", pb.SaveDeltaRequest(delta=saved.to_message(), overwrite=overwrite)).z_dim

    def list_deltas(self) -> list[SavedDelta]:
        return [SavedDelta.from_message(m) for m in self._call("ListDeltas", pb.ListDeltasRequest(), timeout=30).deltas]

    def delete_delta(self, name: str) -> None:
        self._call("DeleteDelta", pb.DeleteDeltaRequest(name=name), timeout=30)

    def predict(self, texts: Sequence[tuple[str, str | None]], name: str = "",
                delta: SavedDelta | None = None) -> Prediction:
        """Labels and class probabilities of (text_a, text_b) pairs under a stored delta
        (`name`) or one given whole (`delta`). One call is one API call."""
        response = self._call("Predict", pb.PredictRequest(
            delta_name=name, delta=delta.to_message() if delta is not None else None, texts=_examples(texts)))
        return _prediction(response)

    def predict_stream(self, slices: Iterable[Sequence[tuple[str, str | None]]], name: str = "",
                       delta: SavedDelta | None = None) -> Iterator[Prediction]:
        """`predict` of each slice of texts, in order, over one streamed call (PredictStream):
        the next slice goes out while the server scores this one. Each slice is one API
        call. A slice's Prediction comes as soon as the server has scored it; the stream
        has no overall deadline (keepalive pings notice a server that is gone)."""
        def requests() -> Iterator[pb.PredictRequest]:
            for number, texts in enumerate(slices):
                if number == 0:
                    yield pb.PredictRequest(delta_name=name, delta=delta.to_message() if delta is not None else None,
                                            texts=_examples(texts))
                else:
                    yield pb.PredictRequest(texts=_examples(texts))

        try:
            for response in self._stub.PredictStream(requests(), metadata=self._metadata):
                yield _prediction(response)
        except grpc.RpcError as error:
            raise BackboneError(error.code(), error.details(), self.address, "PredictStream") from None

    def generate(self, texts: Sequence[tuple[str, str | None]], name: str = "", delta: SavedDelta | None = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 stop: Sequence[str] = ()) -> list[Generation]:
        """Each text's continuation under the delta, from the template up to {mask}."""
        response = self._call("Generate", pb.GenerateRequest(
            delta_name=name, delta=delta.to_message() if delta is not None else None, texts=_examples(texts),
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=list(stop)))
        return [Generation(g.text, tuple(g.tokens), g.finish_reason) for g in response.generations]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "BackboneClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prediction(response: pb.PredictResponse) -> Prediction:
    probabilities = tensor_to_array(response.probabilities) if response.HasField("probabilities") else None
    return Prediction(np.asarray(response.labels), probabilities, tuple(response.label_words))


def _examples(texts: Sequence[tuple[str, str | None]]) -> list[pb.Example]:
    return [pb.Example(text_a=text_a, text_b=text_b or "") for text_a, text_b in texts]


def _lost(error: BackboneError) -> bool:
    """Whether a call failed because the server went away or restarted (and lost the session)."""
    return error.code == grpc.StatusCode.UNAVAILABLE or (
        error.code == grpc.StatusCode.NOT_FOUND and "no session" in error.details)


class Session:
    """A task uploaded to one server; `evaluate` scores populations on its splits.

    It keeps what it was created with, so that it can create itself again on a server
    that restarted (`BackboneClient.recover_s`)."""

    MAX_RECOVERIES = 100  # over the session's life: a server restarting forever is an error

    def __init__(self, client: BackboneClient, splits: dict[str, Sequence], template: str,
                 verbalizer: Sequence[str], delta: DeltaSpec, truncate: bool = False):
        self.client = client
        self.delta = delta
        self._task = (splits, template, verbalizer, delta, truncate)
        self.recoveries = 0
        self.closed = False
        self.metered_calls = 0  # API calls as the server meters them: candidates per request
        self._created(client._create_session(*self._task))

    def _created(self, response: pb.CreateSessionResponse) -> None:
        delta = self.delta
        self.id = response.session_id
        self.split_sizes = dict(response.split_sizes)
        self.prompt_position = response.prompt_position
        self.prefix_reuse = response.prefix_reuse
        # z's length and its (name, size) blocks; servers older than the field send neither.
        self.z_dim = response.z_dim or delta.intrinsic_dim
        self.z_blocks = [(block.name, block.size) for block in response.z_blocks] or [("z", self.z_dim)]
        self.delta_size = response.delta_size  # D; 0 from servers older than the field

    def _call(self, method: str, request_of: Callable[[str], object], candidates: int):
        """The call, made again on a re-created session after the server restarted."""
        client = self.client
        while True:
            try:
                response = client._call(method, request_of(self.id))
                self.metered_calls += candidates
                return response
            except BackboneError as error:
                if (self.closed or not client.recover_s or not _lost(error)
                        or self.recoveries >= self.MAX_RECOVERIES):
                    raise
                self._recover(error)

    def _recover(self, error: BackboneError) -> None:
        client = self.client
        self.recoveries += 1
        client.on_event(f"the backbone at {client.address} answered {error.code.name} ({error.details}); "
                        f"waiting up to {client.recover_s:g} s for it to serve again")
        client.wait_ready(timeout=client.recover_s)
        response = client._create_session(*self._task)
        if response.z_dim and response.z_dim != self.z_dim:
            raise BackboneError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the server came back with a different model: z has {response.z_dim} coordinates, "
                                f"not {self.z_dim}", client.address, "CreateSession")
        self._created(response)
        client.on_event(f"re-created the session on {client.address}; repeating the call")

    def evaluate(self, split: str, z: np.ndarray, start: int = 0, count: int = 0,
                 return_logits: bool = False) -> Scores:
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        wire_z = array_to_tensor(z)
        response = self._call("Evaluate", lambda session_id: pb.EvaluateRequest(
            session_id=session_id, split=split, z=wire_z, start=start, count=count,
            return_logits=return_logits,
        ), len(z))
        return Scores(
            ce_loss=tensor_to_array(response.ce_loss),
            hinge_loss=tensor_to_array(response.hinge_loss),
            accuracy=tensor_to_array(response.accuracy),
            logits=tensor_to_array(response.logits) if response.HasField("logits") else None,
            num_examples=response.num_examples,
            server_ms=response.server_ms,
        )

    def gradient(self, split: str, z: np.ndarray, start: int = 0, count: int = 0, loss: str = "ce") -> Gradients:
        """d loss / d z at each row of z; only servers started with --allow-gradients answer."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        wire_z = array_to_tensor(z)
        response = self._call("Gradient", lambda session_id: pb.GradientRequest(
            session_id=session_id, split=split, z=wire_z, start=start, count=count, loss=loss,
        ), len(z))
        return Gradients(
            loss=tensor_to_array(response.loss),
            accuracy=tensor_to_array(response.accuracy),
            grad=tensor_to_array(response.grad),
            num_examples=response.num_examples,
            server_ms=response.server_ms,
        )

    def close(self) -> None:
        self.closed = True
        self.client._call("CloseSession", pb.CloseSessionRequest(session_id=self.id), timeout=30)
