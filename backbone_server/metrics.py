"""Prometheus metrics of a server (`--metrics-port`), in a registry of its own so that
several servers in one process (tests, benchmarks) keep separate counts.

Requests and errors by method and code, their latency, the forwards (tokens, seconds,
how full each was against the token bound), sessions per tenant, cache bytes and
evictions, and the API calls metered per tenant (from the server's store, so they
survive restarts as the quota does).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OCCUPANCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class ServerMetrics:
    def __init__(self, engine: Callable[[], object | None]):
        """`engine()`: the server's engine once its model is loaded, else None."""
        self.registry = CollectorRegistry()
        self.requests = Counter("blackbox_requests", "RPCs answered, by method and status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("blackbox_request_seconds", "time to answer an RPC, by method", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.forward_tokens = Counter("blackbox_forward_tokens", "(row x token) positions run through the model",
                                      registry=self.registry)
        self.forward_seconds = Histogram("blackbox_forward_seconds", "time of one batched forward",
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens_per_second = Gauge("blackbox_tokens_per_second", "tokens per second of the last forward",
                                       registry=self.registry)
        self.occupancy = Histogram("blackbox_batch_occupancy", "tokens of a forward over its token bound",
                                   buckets=OCCUPANCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def observe_forward(self, tokens: int, bound: int, seconds: float) -> None:
        self.forward_tokens.inc(tokens)
        self.forward_seconds.observe(seconds)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)
        if bound > 0:
            self.occupancy.observe(min(1.0, tokens / bound))

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Serves /metrics over HTTP on host:port (0: a free port); returns (server, port)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_address[1]


class _EngineCollector:
    """What the engine holds, read when scraped."""

    def __init__(self, engine: Callable[[], object | None]):
        self._engine = engine

    def collect(self):
        engine = self._engine()
        if engine is None:
            return
        sessions = GaugeMetricFamily("blackbox_sessions", "sessions held, by tenant", labels=["tenant"])
        for tenant, count in engine.sessions.by_tenant().items():
            sessions.add_metric([tenant], count)
        yield sessions
        yield CounterMetricFamily("blackbox_sessions_expired", "sessions closed by the idle time-out",
                                  value=engine.sessions.expired)
        caches = {"prefix_states": engine.batcher.store, "ranges": engine.batcher.ranges}
        cache_bytes = GaugeMetricFamily("blackbox_cache_bytes", "bytes held by each cache", labels=["cache"])
        evictions = CounterMetricFamily("blackbox_cache_evictions", "entries evicted to stay within the cache's bound",
                                        labels=["cache"])
        for name, cache in caches.items():
            cache_bytes.add_metric([name], cache.bytes)
            evictions.add_metric([name], cache.evictions)
        yield cache_bytes
        yield evictions
        calls = CounterMetricFamily("blackbox_tenant_calls", "API calls metered, by tenant", labels=["tenant"])
        examples = CounterMetricFamily("blackbox_tenant_examples", "candidate x example pairs scored, by tenant",
                                       labels=["tenant"])
        for tenant, use in engine.store.all_use().items():
            calls.add_metric([tenant], use.calls)
            examples.add_metric([tenant], use.examples)
        yield calls
        yield examples
