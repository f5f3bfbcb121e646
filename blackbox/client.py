"""The client side of the Backbone service: sessions, populations in, scores out.

gRPC statuses become `BackboneError`s whose message says what went wrong and what the
server said, so a CLI user never sees a raw RpcError.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blackbox.v1 import backbone_pb2 as pb
from blackbox.v1 import backbone_pb2_grpc
from blackbox.v1.delta_spec import DeltaForm, DeltaSpec, KindInfo
from blackbox.v1.messages import message_fields
from blackbox.v1.wire import GRPC_OPTIONS, array_to_tensor, tensor_to_array

__all__ = ["BackboneClient", "BackboneError", "DeltaForm", "DeltaSpec", "Gradients", "KindInfo", "ModelInfo",
           "Scores", "Session"]


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


@dataclass
class Gradients:
    loss: np.ndarray  # (P,)
    accuracy: np.ndarray  # (P,)
    grad: np.ndarray  # (P, d): d loss / d z
    num_examples: int
    server_ms: float


class BackboneClient:
    def __init__(self, address: str):
        self.address = address
        self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._stub = backbone_pb2_grpc.BackboneStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
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

    def upload_subspace(self, name: str, data: bytes) -> pb.UploadSubspaceResponse:
        """Asks the server to host a subspace file's bytes under `name` (if it accepts uploads)."""
        return self._call("UploadSubspace", pb.UploadSubspaceRequest(name=name, data=data), timeout=120)

    def get_info(self) -> ModelInfo:
        info = self._call("GetInfo", pb.GetInfoRequest(), timeout=30)
        return ModelInfo(**message_fields(info, ModelInfo, exclude=("kinds",)),
                         kinds={kind.name: KindInfo.from_message(kind) for kind in info.kinds})

    def create_session(self, splits: dict[str, Sequence], template: str, verbalizer: Sequence[str],
                       delta: DeltaSpec, truncate: bool = False) -> "Session":
        """`splits` maps a name to examples with text_a, text_b (or None) and label."""
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
        response = self._call("CreateSession", request)
        return Session(self, response, delta)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "BackboneClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Session:
    """A task uploaded to one server; `evaluate` scores populations on its splits."""

    def __init__(self, client: BackboneClient, response: pb.CreateSessionResponse, delta: DeltaSpec):
        self.client = client
        self.id = response.session_id
        self.delta = delta
        self.split_sizes = dict(response.split_sizes)
        self.prompt_position = response.prompt_position
        self.prefix_reuse = response.prefix_reuse
        # z's length and its (name, size) blocks; servers older than the field send neither.
        self.z_dim = response.z_dim or delta.intrinsic_dim
        self.z_blocks = [(block.name, block.size) for block in response.z_blocks] or [("z", self.z_dim)]
        self.delta_size = response.delta_size  # D; 0 from servers older than the field

    def evaluate(self, split: str, z: np.ndarray, start: int = 0, count: int = 0,
                 return_logits: bool = False) -> Scores:
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        response = self.client._call("Evaluate", pb.EvaluateRequest(
            session_id=self.id, split=split, z=array_to_tensor(z), start=start, count=count,
            return_logits=return_logits,
        ))
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
        response = self.client._call("Gradient", pb.GradientRequest(
            session_id=self.id, split=split, z=array_to_tensor(z), start=start, count=count, loss=loss,
        ))
        return Gradients(
            loss=tensor_to_array(response.loss),
            accuracy=tensor_to_array(response.accuracy),
            grad=tensor_to_array(response.grad),
            num_examples=response.num_examples,
            server_ms=response.server_ms,
        )

    def close(self) -> None:
        self.client._call("CloseSession", pb.CloseSessionRequest(session_id=self.id))
