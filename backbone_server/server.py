"""The gRPC server around the engine: tenants, TLS, health, reflection, error mapping,
metrics, idle sessions closed, graceful stop.

`create_server` binds and starts at once with health NOT_SERVING, loads the model in a
background thread, and flips health to SERVING when the engine is ready, so a client can
connect immediately and wait on the standard health check (which alone needs no key).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from backbone_server.engine import Limits
from backbone_server.errors import InvalidArgument, ServiceError
from backbone_server.metrics import ServerMetrics
from backbone_server.options import add_server_arguments
from backbone_server.servicer import BackboneServicer
from backbone_server.subspace import parse_hosted
from backbone_server.tenants import KeysFileError, TenantDirectory, load_tenants
from blackbox.v1 import backbone_pb2, backbone_pb2_grpc
from blackbox.v1.channel import server_options
from blackbox.v1.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

SERVICE_NAME = backbone_pb2.DESCRIPTOR.services_by_name["Backbone"].full_name
MAX_DETAILS = 1000  # characters of an error message sent back (gRPC caps status metadata)
_UNDECODABLE = object()


def _decoding(deserialize):
    """The method's request parser, answering a sentinel instead of raising: gRPC would
    turn a parse failure into INTERNAL and log a traceback per request."""
    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:
            return _UNDECODABLE
    return parse


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Domain errors become their status codes; anything else is INTERNAL with a generic
    message (the traceback goes to the server log, not to the caller). Requests that do
    not parse are INVALID_ARGUMENT. Every answer is counted in the metrics."""

    def __init__(self, metrics: ServerMetrics | None = None):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        short_method = method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def guarded(request, context):
                with self._answering(method, context):
                    if request is _UNDECODABLE:
                        raise InvalidArgument(f"the request is not a valid {short_method} request message")
                    return inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                guarded, request_deserializer=_decoding(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            def guarded_stream(requests, context):
                with self._answering(method, context):
                    yield from inner_stream(_decoded(requests, short_method), context)

            return grpc.stream_stream_rpc_method_handler(
                guarded_stream, request_deserializer=_decoding(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return handler

    @contextmanager
    def _answering(self, method: str, context) -> Iterator[None]:
        """Runs one call's body: its error, if any, becomes the call's status."""
        began = time.perf_counter()
        code, details = grpc.StatusCode.OK, ""
        try:
            yield
        except ServiceError as error:
            code, details = error.code, str(error)
        except Exception:
            log.exception("unexpected error in %s", method)
            code, details = grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log"
        finally:
            if self.metrics is not None:
                self.metrics.observe_request(method.rsplit("/", 1)[-1], code.name, time.perf_counter() - began)
        if code != grpc.StatusCode.OK:
            if len(details) > MAX_DETAILS:
                details = details[:MAX_DETAILS] + " ..."
            context.abort(code, details)


def _decoded(requests: Iterator, method: str) -> Iterator:
    """A stream's requests, the first that does not parse refused."""
    for request in requests:
        if request is _UNDECODABLE:
            raise InvalidArgument(f"a request of the stream is not a valid {method} request message")
        yield request


@dataclass
class Service:
    """Who may call the server and what each call may ask for."""

    tenants: TenantDirectory = field(default_factory=TenantDirectory)
    allow_logits: bool | None = None  # None: on for an open server, off for one with tenants
    limits: Limits = field(default_factory=Limits)
    state_db: str | Path | None = None  # the SQLite file of what survives restarts (None: memory)
    tls: tuple[bytes, bytes] | None = None  # (certificate chain, private key), PEM
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    range_cache_mb: float = 256
    session_cache_mb: float = 64
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # How long a step waits for other requests' steps to share its forward (0: off;
    # None: DEFAULT_WINDOW_MS on a GPU, off on a CPU), and the most tokens of a merged
    # forward (0: the memory bound; None: that on a GPU, CPU_MERGE_TOKENS on a CPU).
    batch_window_ms: float | None = None
    merge_max_tokens: int | None = None

    @property
    def logits(self) -> bool:
        return (not self.tenants.keyed) if self.allow_logits is None else self.allow_logits


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    servicer: BackboneServicer
    health: health.HealthServicer
    ready: threading.Event
    load_error: list
    metrics: ServerMetrics
    metrics_port: int | None = None
    tls: bool = False
    _stopped: threading.Event = field(default_factory=threading.Event)
    _metrics_server: object | None = None

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
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        engine = self.servicer.engine
        if engine is not None:
            engine.store.close()


def create_server(model: str, address: str = "127.0.0.1:0", device: str = "auto", dtype: str = "auto",
                  max_batch_tokens: int = 0, max_workers: int = 8, prefix_reuse: bool = True,
                  allow_gradients: bool = False, device_map: str | None = None,
                  backbone=None, prefix_cache_mb: int = 0, subspaces: dict | None = None,
                  allow_subspace_uploads: bool = False, max_subspace_mb: float = 64,
                  service: Service | None = None) -> RunningServer:
    """Starts a server on `address` (port 0 picks a free port) and loads `model` behind it.

    `device_map` ("auto": through accelerate, across all visible devices) replaces
    `device` for models larger than one GPU. `backbone`: an already loaded `Backbone` to
    serve instead of loading `model` (benchmarks, tests); `model` then only names it.
    `subspaces`: {NAME: Subspace} the sessions may select as "subspace:NAME".
    `service`: tenants, TLS, limits, metrics (default: open, plain, in memory).
    """
    from backbone_server.batching import RangeCache
    from backbone_server.store import ServerStore

    service = service or Service()
    servicer = BackboneServicer(tenants=service.tenants, allow_logits=service.logits)
    metrics = ServerMetrics(lambda: servicer.engine)
    health_servicer = health.HealthServicer()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[ErrorMappingInterceptor(metrics)],
        options=server_options(service.max_message_bytes),
    )
    backbone_pb2_grpc.add_BackboneServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if service.tls is not None:
        certificate, key = service.tls
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, certificate)]))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    store = ServerStore(service.state_db)  # before serving: a bad path fails here, loudly
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()

    ready = threading.Event()
    load_error: list = []
    running = RunningServer(server, port, servicer, health_servicer, ready, load_error, metrics,
                            tls=service.tls is not None)
    if service.metrics_port is not None:
        running._metrics_server, running.metrics_port = metrics.serve(service.metrics_port, service.metrics_host)

    def load() -> None:
        from backbone_server.engine import Engine
        from backbone_server.models import load_backbone

        try:
            loaded = backbone if backbone is not None else load_backbone(
                model, device=device, dtype=dtype, device_map=device_map)
            engine = Engine(loaded, max_batch_tokens=max_batch_tokens, prefix_reuse=prefix_reuse,
                            allow_gradients=allow_gradients, prefix_cache_bytes=prefix_cache_mb * 2**20,
                            subspaces=subspaces, allow_subspace_uploads=allow_subspace_uploads,
                            max_subspace_bytes=int(max_subspace_mb * 2 ** 20), limits=service.limits,
                            range_cache=RangeCache(int(service.range_cache_mb * 2**20),
                                                   int(service.session_cache_mb * 2**20)),
                            store=store, batch_window_ms=service.batch_window_ms,
                            merge_max_tokens=service.merge_max_tokens)
            engine.scorer.on_forward = metrics.observe_forward
            servicer.engine = engine
            for name in ("", SERVICE_NAME):
                health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("serving %s on %s (%s, %s)", model, port, loaded.device, loaded.dtype)
            if service.limits.session_ttl_s:
                threading.Thread(target=_expire_idle_sessions, args=(engine, running._stopped),
                                 name="session-expiry", daemon=True).start()
        except ServiceError as error:  # the operator's mistake (a model or device that is not there)
            log.info("cannot load %s: %s", model, error)
            load_error.append(error)
        except Exception as error:  # reported through wait_ready, and with its traceback in the log
            log.exception("loading %s failed", model)
            load_error.append(error)
        finally:
            ready.set()

    threading.Thread(target=load, name="model-loader", daemon=True).start()
    return running


def _expire_idle_sessions(engine, stopped: threading.Event) -> None:
    """Closes idle sessions even when no call comes to do it, so that their memory goes."""
    interval = max(0.05, min(30.0, engine.limits.session_ttl_s / 4))
    while not stopped.wait(interval):
        expired = engine.sessions.expire()
        if expired:
            log.info("closed %d idle session(s) (idle over %g s)", expired, engine.limits.session_ttl_s)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def service_from_args(args: argparse.Namespace) -> Service:
    """The serve command's service options; every mistake is one ValueError (KeysFileError)."""
    tenants = TenantDirectory(load_tenants(args.api_keys)) if args.api_keys else TenantDirectory()
    if not tenants.keyed and not is_loopback(args.host) and not args.insecure_open:
        raise ValueError(f"refusing to serve {args.host} without API keys: anyone who reaches the port could use "
                         "every session on it. Pass --api-keys FILE (`blackbox keys new`), bind 127.0.0.1, or "
                         "pass --insecure-open to serve it open anyway")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together: the certificate chain and its private key")
    tls = None
    if args.tls_cert:
        try:
            tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())
        except OSError as error:
            raise ValueError(f"cannot read {error.filename}: {error.strerror}") from None
    if args.batch_window_ms is not None and args.batch_window_ms < 0:
        raise ValueError("--batch-window-ms is >= 0 (0: every request's chunks in forwards of their own)")
    if args.merge_max_tokens is not None and args.merge_max_tokens < 0:
        raise ValueError("--merge-max-tokens is >= 0 (0: as many as memory allows)")
    if args.session_ttl < 0:
        raise ValueError("--session-ttl is in seconds, >= 0 (0: sessions never expire)")
    state_db = args.state_db
    if state_db is None and args.api_keys:  # a keyed server's quotas must survive its restarts
        state_db = str(Path(args.api_keys).with_suffix(".state.sqlite"))
    return Service(
        tenants=tenants, allow_logits=True if args.allow_logits else None,
        limits=Limits(max_sessions=args.max_sessions, max_examples_per_session=args.max_examples,
                      session_ttl_s=args.session_ttl, max_delta_bytes=int(args.max_delta_mb * 2**20)),
        state_db=state_db, tls=tls, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        range_cache_mb=args.cache_mb, session_cache_mb=args.session_cache_mb,
        max_message_bytes=int(args.max_message_mb * 2**20), batch_window_ms=args.batch_window_ms,
        merge_max_tokens=args.merge_max_tokens,
    )


def serve(args: argparse.Namespace) -> int:
    """Runs until SIGINT/SIGTERM, then stops gracefully."""
    try:  # a bad keys file, certificate or subspace file costs no model load
        subspaces = parse_hosted(args.subspace, int(args.max_subspace_mb * 2 ** 20))
        service = service_from_args(args)
    except (ServiceError, KeysFileError, ValueError) as error:
        print(f"error: {error}", flush=True)
        return 2
    if not service.tenants.keyed and not is_loopback(args.host):
        log.warning("serving %s OPEN (--insecure-open): no keys, every caller is one tenant", args.host)
    try:
        running = create_server(args.model, f"{args.host}:{args.port}", args.device, args.dtype,
                                args.max_batch_tokens, prefix_reuse=not args.no_prefix_reuse,
                                allow_gradients=args.allow_gradients, device_map=args.device_map,
                                prefix_cache_mb=args.prefix_cache_mb, subspaces=subspaces,
                                allow_subspace_uploads=args.allow_subspace_uploads,
                                max_subspace_mb=args.max_subspace_mb, service=service)
    except OSError as error:
        print(f"error: {error}", flush=True)
        return 2
    scheme = "grpcs" if running.tls else "grpc"
    who = f"{len(service.tenants.names())} tenant(s)" if service.tenants.keyed else "open, no keys"
    print(f"backbone server listening on {args.host}:{running.port}; loading {args.model} ... "
          f"({scheme}, {who})", flush=True)
    if running.metrics_port is not None:
        print(f"metrics on http://{args.metrics_host}:{running.metrics_port}/metrics", flush=True)
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
