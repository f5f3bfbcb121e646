"""The Backbone service: protobuf messages in, engine calls, protobuf messages out.

Every call but the health check names its tenant (`TenantDirectory.authenticate`); the
engine scopes sessions and meters calls by it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from backbone_server.deltas import DeltaConfig, delta_forms, kind_infos
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument, PermissionDenied, Unavailable
from backbone_server.projection import PROJECTION_KINDS
from backbone_server.stored import DeltaLibrary, answers
from backbone_server.subspace import SUBSPACE_PREFIX
from backbone_server.tenants import Tenant, TenantDirectory
from blackbox.v1 import backbone_pb2 as pb
from blackbox.v1 import backbone_pb2_grpc
from blackbox.v1.wire import WireError, array_to_tensor, tensor_to_array


class BackboneServicer(backbone_pb2_grpc.BackboneServicer):
    """Holds the engine once the model is loaded; until then every call is UNAVAILABLE.

    `allow_logits`: whether Evaluate returns the (P, N, C) verbalizer logits when asked.
    """

    def __init__(self, engine: Engine | None = None, tenants: TenantDirectory | None = None,
                 allow_logits: bool = True):
        self.engine = engine
        self.tenants = tenants or TenantDirectory()
        self.allow_logits = allow_logits

    def _engine(self) -> Engine:
        if self.engine is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.engine

    def _caller(self, context) -> tuple[Engine, Tenant]:
        tenant = self.tenants.authenticate(context.invocation_metadata() if context is not None else ())
        return self._engine(), tenant

    def GetInfo(self, request, context):
        engine, _ = self._caller(context)
        backbone = engine.backbone
        kinds = kind_infos(backbone)
        limits = engine.limits
        keyed = self.tenants.keyed
        return pb.ModelInfo(
            # A tenant learns the model, not where the host keeps it nor how much memory it has free.
            model_name=Path(backbone.name).name if keyed else backbone.name,
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
            memory_plan=f"{engine.max_batch_tokens} tokens per forward" if keyed else engine.memory_plan.reason,
            delta_forms=delta_forms(),
            kinds=[kind.to_message() for kind in kinds],
            cache_report=engine.cache_report(),
            logits_enabled=self.allow_logits,
            keyed=keyed,
            limits=pb.Limits(max_population=limits.max_population, max_rows_per_call=limits.max_rows_per_call,
                             max_examples_per_session=limits.max_examples_per_session,
                             max_sessions=limits.max_sessions, session_ttl_s=limits.session_ttl_s,
                             max_delta_bytes=limits.max_delta_bytes),
        )

    def Usage(self, request, context):
        engine, tenant = self._caller(context)
        use = engine.store.use(tenant.name)
        return pb.UsageResponse(
            tenant=tenant.name, calls_used=use.calls, calls_quota=tenant.quota_calls,
            calls_left=max(0, tenant.quota_calls - use.calls) if tenant.quota_calls else -1,
            examples_scored=use.examples, sessions_held=engine.sessions.held_by(tenant.name),
            max_sessions=tenant.max_sessions or engine.limits.max_sessions,
            max_examples=engine.examples_bound(tenant),
        )

    def CreateSession(self, request, context):
        engine, tenant = self._caller(context)
        delta = DeltaConfig.from_message(request.delta)
        splits = {
            split.name: [(e.text_a, e.text_b, e.label) for e in split.examples] for split in request.splits
        }
        if len(splits) != len(request.splits):
            raise InvalidArgument("split names must be unique")
        session = engine.create_session(splits, request.template, list(request.verbalizer), delta,
                                        truncate=request.truncate, tenant=tenant, cancelled=_gone(context))
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
        engine, tenant = self._caller(context)
        if request.return_logits and not self.allow_logits:
            raise PermissionDenied("this server does not return logits (its operator did not pass --allow-logits); "
                                   "score with the losses and accuracies alone (tune --no-calibrate)")
        started = time.perf_counter()
        z = _population(request)
        scores = engine.evaluate(request.session_id, request.split, z, request.start, request.count,
                                 tenant=tenant, cancelled=_gone(context))
        return pb.EvaluateResponse(
            ce_loss=array_to_tensor(scores.ce_loss),
            hinge_loss=array_to_tensor(scores.hinge_loss),
            accuracy=array_to_tensor(scores.accuracy),
            logits=array_to_tensor(scores.logits) if request.return_logits else None,
            num_examples=scores.num_examples,
            server_ms=(time.perf_counter() - started) * 1e3,
        )

    def Gradient(self, request, context):
        engine, tenant = self._caller(context)
        if not engine.allow_gradients:  # before anything of the request is looked at
            engine.check_gradients_allowed()
        started = time.perf_counter()
        gradients = engine.gradient(request.session_id, request.split, _population(request), request.start,
                                    request.count, loss=request.loss or "ce", tenant=tenant,
                                    cancelled=_gone(context))
        return pb.GradientResponse(
            loss=array_to_tensor(gradients.loss),
            accuracy=array_to_tensor(gradients.accuracy),
            grad=array_to_tensor(gradients.grad),
            num_examples=gradients.num_examples,
            server_ms=(time.perf_counter() - started) * 1e3,
        )

    def UploadSubspace(self, request, context):
        engine, _ = self._caller(context)
        subspace = engine.host_subspace(request.name, request.data)
        return pb.UploadSubspaceResponse(projection=SUBSPACE_PREFIX + request.name, dim=subspace.dim,
                                         delta_size=subspace.delta_size)

    def SaveDelta(self, request, context):
        engine, tenant = self._caller(context)
        stored = DeltaLibrary(engine).save(tenant, request.delta, request.overwrite, cancelled=_gone(context))
        return pb.SaveDeltaResponse(name=stored.name, z_dim=len(stored.z.data) // 4)

    def ListDeltas(self, request, context):
        engine, tenant = self._caller(context)
        return pb.ListDeltasResponse(deltas=DeltaLibrary(engine).list(tenant))

    def DeleteDelta(self, request, context):
        engine, tenant = self._caller(context)
        DeltaLibrary(engine).delete(tenant, request.name)
        return pb.DeleteDeltaResponse()

    def Predict(self, request, context):
        engine, tenant = self._caller(context)
        library = DeltaLibrary(engine)
        record = library.resolve(tenant, request.delta_name, request.delta if request.HasField("delta") else None)
        return self._predicted(library, tenant, record, request, context)

    def PredictStream(self, requests, context):
        engine, tenant = self._caller(context)
        library = DeltaLibrary(engine)
        record = None
        for request in requests:
            if record is None:
                record = library.resolve(tenant, request.delta_name,
                                         request.delta if request.HasField("delta") else None)
            elif request.delta_name or request.HasField("delta"):
                raise InvalidArgument("only the first request of a PredictStream names (or gives) the delta; "
                                      "the later ones carry texts only")
            yield self._predicted(library, tenant, record, request, context)

    def _predicted(self, library: DeltaLibrary, tenant: Tenant, record, request, context) -> pb.PredictResponse:
        labels, probabilities = library.predict(tenant, record, _texts(request), cancelled=_gone(context))
        # Class probabilities are the logits up to a constant: the operator's --allow-logits decides.
        return pb.PredictResponse(labels=labels.tolist(),
                                  probabilities=array_to_tensor(probabilities) if self.allow_logits else None,
                                  label_words=answers(record.verbalizer))

    def Generate(self, request, context):
        engine, tenant = self._caller(context)
        library = DeltaLibrary(engine)
        record = library.resolve(tenant, request.delta_name, request.delta if request.HasField("delta") else None)
        results = library.generate(tenant, record, _texts(request), request.max_new_tokens, request.temperature,
                                   request.seed, list(request.stop), cancelled=_gone(context))
        return pb.GenerateResponse(generations=[
            pb.Generation(text=result.text, tokens=list(result.tokens), finish_reason=result.finish_reason)
            for result in results])

    def CloseSession(self, request, context):
        engine, tenant = self._caller(context)
        engine.close_session(request.session_id, tenant)
        return pb.CloseSessionResponse()


def _texts(request) -> list[tuple[str, str]]:
    return [(example.text_a, example.text_b) for example in request.texts]


def _gone(context):
    """Whether the caller has gone away (cancelled, deadline passed): checked between steps."""
    return None if context is None else (lambda: not context.is_active())


def _population(request) -> np.ndarray:
    try:
        return tensor_to_array(request.z, ndim=2)
    except WireError as error:
        raise InvalidArgument(f"z: {error}") from None
