"""The gRPC server around the engine: health, reflection, error mapping, graceful stop.

`create_server` binds and starts at once with health NOT_SERVING, loads the model in a
background thread, and flips health to SERVING when the engine is ready, so a client can
connect immediately and wait on the standard health check.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from backbone_server.errors import ServiceError
from backbone_server.options import add_server_arguments
from backbone_server.servicer import BackboneServicer
from backbone_server.subspace import parse_hosted
from blackbox.v1 import backbone_pb2, backbone_pb2_grpc
from blackbox.v1.wire import GRPC_OPTIONS

log = logging.getLogger(__name__)

SERVICE_NAME = backbone_pb2.DESCRIPTOR.services_by_name["Backbone"].full_name


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Domain errors become their status codes; anything else is INTERNAL with a generic
    message (the traceback goes to the server log, not to the caller)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        def guarded(request, context):
            try:
                return inner(request, context)
            except ServiceError as error:
                context.abort(error.code, str(error))
            except Exception:
                log.exception("unexpected error in %s", method)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    servicer: BackboneServicer
    health: health.HealthServicer
    ready: threading.Event
    load_error: list

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Blocks until the model is loaded; re-raises a loading failure."""
        if not self.ready.wait(timeout):
            raise TimeoutError(f"model not loaded within {timeout} s")
        if self.load_error:
            raise self.load_error[0]

    def stop(self, grace: float | None = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def create_server(model: str, address: str = "127.0.0.1:0", device: str = "auto", dtype: str = "auto",
                  max_batch_tokens: int = 0, max_workers: int = 8, prefix_reuse: bool = True,
                  allow_gradients: bool = False, device_map: str | None = None,
                  backbone=None, prefix_cache_mb: int = 0, subspaces: dict | None = None,
                  allow_subspace_uploads: bool = False, max_subspace_mb: float = 64) -> RunningServer:
    """Starts a server on `address` (port 0 picks a free port) and loads `model` behind it.

    `device_map` ("auto": through accelerate, across all visible devices) replaces
    `device` for models larger than one GPU. `backbone`: an already loaded `Backbone` to
    serve instead of loading `model` (benchmarks, tests); `model` then only names it.
    `subspaces`: {NAME: Subspace} the sessions may select as "subspace:NAME".
    """
    servicer = BackboneServicer()
    health_servicer = health.HealthServicer()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[ErrorMappingInterceptor()],
        options=GRPC_OPTIONS,
    )
    backbone_pb2_grpc.add_BackboneServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()

    ready = threading.Event()
    load_error: list = []

    def load() -> None:
        from backbone_server.engine import Engine
        from backbone_server.models import load_backbone

        try:
            loaded = backbone if backbone is not None else load_backbone(
                model, device=device, dtype=dtype, device_map=device_map)
            servicer.engine = Engine(loaded, max_batch_tokens=max_batch_tokens, prefix_reuse=prefix_reuse,
                                     allow_gradients=allow_gradients, prefix_cache_bytes=prefix_cache_mb * 2**20,
                                     subspaces=subspaces, allow_subspace_uploads=allow_subspace_uploads,
                                     max_subspace_bytes=int(max_subspace_mb * 2 ** 20))
            for name in ("", SERVICE_NAME):
                health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("serving %s on %s (%s, %s)", model, port, loaded.device, loaded.dtype)
        except ServiceError as error:  # the operator's mistake (a model or device that is not there)
            log.info("cannot load %s: %s", model, error)
            load_error.append(error)
        except Exception as error:  # reported through wait_ready, and with its traceback in the log
            log.exception("loading %s failed", model)
            load_error.append(error)
        finally:
            ready.set()

    threading.Thread(target=load, name="model-loader", daemon=True).start()
    return RunningServer(server, port, servicer, health_servicer, ready, load_error)


def serve(args: argparse.Namespace) -> int:
    """Runs until SIGINT/SIGTERM, then stops gracefully."""
    try:  # a bad subspace file costs no model load
        subspaces = parse_hosted(args.subspace, int(args.max_subspace_mb * 2 ** 20))
    except ServiceError as error:
        print(f"error: {error}", flush=True)
        return 2
    running = create_server(args.model, f"{args.host}:{args.port}", args.device, args.dtype,
                            args.max_batch_tokens, prefix_reuse=not args.no_prefix_reuse,
                            allow_gradients=args.allow_gradients, device_map=args.device_map,
                            prefix_cache_mb=args.prefix_cache_mb, subspaces=subspaces,
                            allow_subspace_uploads=args.allow_subspace_uploads,
                            max_subspace_mb=args.max_subspace_mb)
    print(f"backbone server listening on {args.host}:{running.port}; loading {args.model} ...", flush=True)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    try:
        running.wait_ready()
    except Exception as error:
        print(f"error: could not load {args.model}: {error}", flush=True)
        running.stop(0)
        return 1
    print(f"ready: {args.model} on {running.servicer.engine.backbone.device}", flush=True)
    stopped.wait()
    print("stopping ...", flush=True)
    running.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backbone_server", description="blackbox backbone server")
    add_server_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(parser.parse_args(argv))
