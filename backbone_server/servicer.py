"""The Backbone service: protobuf messages in, engine calls, protobuf messages out."""

from __future__ import annotations

import time

import numpy as np

from backbone_server.deltas import DeltaConfig, delta_forms, kind_infos
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument, Unavailable
from backbone_server.projection import PROJECTION_KINDS
from backbone_server.subspace import SUBSPACE_PREFIX
from blackbox.v1 import backbone_pb2 as pb
from blackbox.v1 import backbone_pb2_grpc
from blackbox.v1.wire import WireError, array_to_tensor, tensor_to_array


class BackboneServicer(backbone_pb2_grpc.BackboneServicer):
    """Holds the engine once the model is loaded; until then every call is UNAVAILABLE."""

    def __init__(self, engine: Engine | None = None):
        self.engine = engine

    def _engine(self) -> Engine:
        if self.engine is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.engine

    def GetInfo(self, request, context):
        engine = self._engine()
        backbone = engine.backbone
        kinds = kind_infos(backbone)
        return pb.ModelInfo(
            model_name=backbone.name,
            architecture=backbone.architecture,
            hidden_size=backbone.hidden_size,
            num_layers=backbone.num_layers,
            vocab_size=backbone.embeddings.weight.shape[0],
            max_length=backbone.max_length,
            delta_kinds=[kind.name for kind in kinds],
            projection_kinds=[*PROJECTION_KINDS, *(SUBSPACE_PREFIX + name for name in engine.subspaces)],
            device=str(backbone.device),
            dtype=str(backbone.dtype).removeprefix("torch."),
            max_batch_tokens=engine.max_batch_tokens,
            gradients_enabled=engine.allow_gradients,
            memory_plan=engine.memory_plan.reason,
            delta_forms=delta_forms(),
            kinds=[kind.to_message() for kind in kinds],
            cache_report=engine.cache_report(),
        )

    def CreateSession(self, request, context):
        engine = self._engine()
        delta = DeltaConfig.from_message(request.delta)
        splits = {
            split.name: [(e.text_a, e.text_b, e.label) for e in split.examples] for split in request.splits
        }
        if len(splits) != len(request.splits):
            raise InvalidArgument("split names must be unique")
        session = engine.create_session(splits, request.template, list(request.verbalizer), delta,
                                        truncate=request.truncate)
        return pb.CreateSessionResponse(
            session_id=session.id,
            verbalizer_token_ids=session.verbalizer_ids.tolist(),
            split_sizes={name: len(examples) for name, examples in session.splits.items()},
            prompt_position=session.encoder.prompt_position,
            prefix_reuse=session.prefix_reuse,
            truncated_examples=session.truncated_examples,
            z_dim=session.delta.z_dim,
            z_blocks=[pb.ZBlock(name=name, size=size) for name, size in session.delta.z_blocks],
            delta_size=session.delta.num_parameters,
        )

    def Evaluate(self, request, context):
        engine = self._engine()
        started = time.perf_counter()
        z = _population(request)
        scores = engine.evaluate(request.session_id, request.split, z, request.start, request.count)
        return pb.EvaluateResponse(
            ce_loss=array_to_tensor(scores.ce_loss),
            hinge_loss=array_to_tensor(scores.hinge_loss),
            accuracy=array_to_tensor(scores.accuracy),
            logits=array_to_tensor(scores.logits) if request.return_logits else None,
            num_examples=scores.num_examples,
            server_ms=(time.perf_counter() - started) * 1e3,
        )

    def Gradient(self, request, context):
        engine = self._engine()
        started = time.perf_counter()
        gradients = engine.gradient(request.session_id, request.split, _population(request), request.start,
                                    request.count, loss=request.loss or "ce")
        return pb.GradientResponse(
            loss=array_to_tensor(gradients.loss),
            accuracy=array_to_tensor(gradients.accuracy),
            grad=array_to_tensor(gradients.grad),
            num_examples=gradients.num_examples,
            server_ms=(time.perf_counter() - started) * 1e3,
        )

    def UploadSubspace(self, request, context):
        subspace = self._engine().host_subspace(request.name, request.data)
        return pb.UploadSubspaceResponse(projection=SUBSPACE_PREFIX + request.name, dim=subspace.dim,
                                         delta_size=subspace.delta_size)

    def CloseSession(self, request, context):
        self._engine().close_session(request.session_id)
        return pb.CloseSessionResponse()


def _population(request) -> np.ndarray:
    try:
        return tensor_to_array(request.z, ndim=2)
    except WireError as error:
        raise InvalidArgument(f"z: {error}") from None
