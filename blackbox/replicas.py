"""Several backbone servers as one: `--server A,B,...`.

A `ReplicaPool` looks like a `BackboneClient` to the tuner. Every session exists on every
replica; each call splits the population's rows into contiguous near-equal shares, one per
live replica, scores the shares concurrently and concatenates the answers in order. Rows
are scored independently, so the merged answer is the one a single server gives.

A replica whose call fails as if it were gone (unreachable, stalled past the keepalive,
restarted and lost the session) is marked dead and its share is scored by the others; a
caller's error (INVALID_ARGUMENT and the like) is raised as it is, and so is INTERNAL (a
bug of the server, which another replica would repeat). A dead replica is probed again
every REPROBE_S seconds: once it serves, each session is created on it again and it takes
its share. With every replica gone, a call waits up to `recover_s` for one to come back.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from blackbox.client import DEFAULT_RECOVER_S, BackboneClient, BackboneError, DeltaSpec, ModelInfo, Session

log = logging.getLogger(__name__)

# Fields every replica must agree on: the same model, loaded the same way.
SAME_MODEL_FIELDS = ("model_name", "architecture", "hidden_size", "num_layers", "vocab_size", "dtype")

# Statuses that mean the replica is gone or broken, not that the request was wrong.
GONE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
REPROBE_S = 5.0  # how often a dead replica is asked whether it serves again


def _replica_gone(error: BackboneError) -> bool:
    # NOT_FOUND of the session (not of a split) means the server restarted and lost it.
    return error.code in GONE_CODES or (error.code == grpc.StatusCode.NOT_FOUND and "no session" in error.details)


def _shares(first: int, end: int, parts: int) -> list[tuple[int, int]]:
    """Rows first..end-1 as at most `parts` contiguous near-equal (first, end) ranges."""
    bounds = np.linspace(first, end, min(parts, max(end - first, 1)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _merge(parts: list[Any], rows: list[int]) -> Any:
    """One result from the shares' results (dataclasses), in row order: per-row arrays are
    concatenated, server_ms is the slowest share's, anything else is taken from the first."""
    merged = {}
    for field in dataclasses.fields(parts[0]):
        values = [getattr(part, field.name) for part in parts]
        if field.name == "server_ms":
            merged[field.name] = max(values)
        elif all(isinstance(v, np.ndarray) and v.ndim and len(v) == n for v, n in zip(values, rows)):
            merged[field.name] = np.concatenate(values, axis=0)
        else:
            merged[field.name] = values[0]
    return type(parts[0])(**merged)


class ReplicaPool:
    """Backbone servers hosting the same model, used through the `BackboneClient` interface."""

    def __init__(self, addresses: Sequence[str], recover_s: float = DEFAULT_RECOVER_S, **client_options):
        """`client_options`: BackboneClient's (api_key, tls, tls_ca, call_timeout, on_event)."""
        addresses = list(addresses)
        if not addresses:
            raise ValueError("a replica pool needs at least one server address")
        if len(set(addresses)) < len(addresses):
            raise ValueError(f"a server is listed twice in {','.join(addresses)}")
        self.address = ",".join(addresses)
        # Each replica fails at once when gone: the pool, not the client, rides it out.
        self.clients = [BackboneClient(address, recover_s=0, **client_options) for address in addresses]
        self.recover_s = recover_s
        self.on_event = self.clients[0].on_event
        self.errors: dict[int, BackboneError] = {}  # replica -> the error that killed it
        self._probed: dict[int, float] = {}  # dead replica -> when it was last probed
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=len(addresses), thread_name_prefix="replica")

    def live(self) -> list[int]:
        with self._lock:
            return [i for i in range(len(self.clients)) if i not in self.errors]

    def next_turn(self) -> int:
        with self._lock:
            return next(self._turn)

    def mark_dead(self, replica: int, error: BackboneError) -> None:
        with self._lock:
            if replica in self.errors:
                return
            self.errors[replica] = error
            left = len(self.clients) - len(self.errors)
        log.warning("backbone replica %s dropped (%s: %s); %d left", self.clients[replica].address,
                    error.code.name, error.details, left)

    def due_for_probe(self, replicas: Sequence[int]) -> list[int]:
        """Those of `replicas` not probed within REPROBE_S, each then counted as probed now."""
        now = time.monotonic()
        with self._lock:
            due = [i for i in replicas if now - self._probed.get(i, -REPROBE_S) >= REPROBE_S]
            self._probed.update({i: now for i in due})
        return due

    def mark_alive(self, replica: int) -> None:
        with self._lock:
            if self.errors.pop(replica, None) is None:
                return
        self.on_event(f"backbone replica {self.clients[replica].address} is back")

    def all_failed(self, method: str) -> BackboneError:
        with self._lock:
            errors = dict(self.errors)
        causes = "; ".join(f"{self.clients[i].address}: {e.code.name}: {e.details}" for i, e in errors.items())
        return BackboneError(list(errors.values())[-1].code, f"all replicas failed ({causes})", self.address, method)

    def each_live(self, call: Callable[[BackboneClient], Any], method: str) -> dict[int, Any]:
        """call(client) on every live replica at once -> {replica: result}; gone ones are dropped."""
        replicas = self.live()
        results, _ = self.gather([(i, lambda c=self.clients[i]: call(c)) for i in replicas])
        if not results:
            raise self.all_failed(method)
        return {replicas[k]: result for k, result in results.items()}

    def gather(self, calls: list[tuple[int, Callable[[], Any]]]) -> tuple[dict[int, Any], list[int]]:
        """Runs the calls at once, each (replica, call). Returns {position: result} and the
        positions whose replica turned out gone (marked dead); raises a caller's error once
        every call has answered."""
        futures = [self._executor.submit(call) for _, call in calls]
        results, failed, caller_error = {}, [], None
        for position, ((replica, _), future) in enumerate(zip(calls, futures)):
            try:
                results[position] = future.result()
            except BackboneError as error:
                if not _replica_gone(error):
                    caller_error = caller_error or error
                    continue
                self.mark_dead(replica, error)
                failed.append(position)
        if caller_error is not None:
            raise caller_error
        return results, failed

    def wait_ready(self, timeout: float = 30.0, poll: float = 0.5,
                   on_wait: Callable[[str], None] | None = None) -> None:
        """Waits until every replica serves, then checks they all host the same model."""
        def wait(client: BackboneClient) -> None:
            client.wait_ready(timeout, poll, None if on_wait is None else
                              lambda heard: on_wait(f"{client.address}: {heard}"))

        list(self._executor.map(wait, self.clients))
        self.get_info()

    def get_info(self) -> ModelInfo:
        infos = self.each_live(lambda client: client.get_info(), "GetInfo")
        first, reference = next(iter(infos.items()))
        for replica, info in infos.items():
            for field in SAME_MODEL_FIELDS:
                if getattr(info, field) != getattr(reference, field):
                    raise ValueError(
                        f"backbone replicas differ: {self.clients[replica].address} has {field} "
                        f"{getattr(info, field)!r}, {self.clients[first].address} has {getattr(reference, field)!r}")
        # Gradient calls may land on any replica: the pool answers them only if all do.
        return dataclasses.replace(reference, gradients_enabled=all(i.gradients_enabled for i in infos.values()))

    def create_session(self, splits: dict[str, Sequence], template: str, verbalizer: Sequence[str],
                       delta: DeltaSpec, truncate: bool = False) -> "ReplicatedSession":
        task = (splits, template, verbalizer, delta, truncate)
        sessions = self.each_live(lambda client: client.create_session(*task), "CreateSession")
        return ReplicatedSession(self, sessions, task)

    def save_delta(self, saved, overwrite: bool = False) -> int:
        """Stores the delta on every live replica (each keeps its own store)."""
        return next(iter(self.each_live(lambda client: client.save_delta(saved, overwrite), "SaveDelta").values()))

    def list_deltas(self):
        return next(iter(self.each_live(lambda client: client.list_deltas(), "ListDeltas").values()))

    def close(self) -> None:
        self._executor.shutdown(wait=False)
        for client in self.clients:
            client.close()

    def __enter__(self) -> "ReplicaPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ReplicatedSession:
    """One session per live replica, used through the `Session` interface."""

    def __init__(self, pool: ReplicaPool, sessions: dict[int, Session], task: tuple):
        self.pool = pool
        self.sessions = sessions
        self._task = task  # what each session was created with, to create it on a replica back
        first = next(iter(sessions.values()))
        self.delta = first.delta
        self.split_sizes = first.split_sizes
        self.prompt_position = first.prompt_position
        self.prefix_reuse = first.prefix_reuse
        self.z_dim = first.z_dim
        self.z_blocks = first.z_blocks
        self.delta_size = first.delta_size

    def evaluate(self, split: str, z: np.ndarray, start: int = 0, count: int = 0, return_logits: bool = False):
        return self._spread("evaluate", split, z, start=start, count=count, return_logits=return_logits)

    def gradient(self, split: str, z: np.ndarray, start: int = 0, count: int = 0, loss: str = "ce"):
        """Per-row gradients, where the client's `Session` has `gradient`."""
        return self._spread("gradient", split, z, start=start, count=count, loss=loss)

    def _spread(self, method: str, split: str, z: np.ndarray, **kwargs):
        """Session.`method` on the rows of z, spread over the live replicas, retried on
        the survivors when a replica is gone."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        done: dict[tuple[int, int], Any] = {}
        pending = [(0, len(z))]
        while pending:
            live = self._live(method)
            turn = self.pool.next_turn()
            shares = [share for first, end in pending for share in _shares(first, end, len(live))]
            owners = [live[(turn + k) % len(live)] for k in range(len(shares))]
            calls = [(owner, lambda call=getattr(self.sessions[owner], method), rows=share:
                      call(split, z[rows[0]:rows[1]], **kwargs))
                     for owner, share in zip(owners, shares)]
            results, failed = self.pool.gather(calls)
            done.update({shares[k]: result for k, result in results.items()})
            pending = [shares[k] for k in failed]
        order = sorted(done)
        return _merge([done[share] for share in order], [end - first for first, end in order])

    @property
    def id(self) -> str:
        return ",".join(session.id for session in self.sessions.values())

    @property
    def metered_calls(self) -> int:
        return sum(session.metered_calls for session in self.sessions.values())

    def _live(self, method: str) -> list[int]:
        """The replicas holding this session now, after bringing back those that serve
        again; with none, waits up to the pool's recover_s for one."""
        deadline = time.monotonic() + self.pool.recover_s
        waited = False
        while True:
            self._revive()
            live = [i for i in self.pool.live() if i in self.sessions]
            if live:
                return live
            if time.monotonic() >= deadline:
                raise self.pool.all_failed(method.capitalize())
            if not waited:
                self.pool.on_event(f"every backbone replica is gone; waiting up to {self.pool.recover_s:g} s "
                                   "for one to come back")
                waited = True
            time.sleep(min(1.0, REPROBE_S))

    def _revive(self) -> None:
        """Creates the session on the replicas that serve again (or never had it)."""
        live = set(self.pool.live())
        missing = [i for i in range(len(self.pool.clients)) if i not in live or i not in self.sessions]
        for replica in self.pool.due_for_probe(missing):
            client = self.pool.clients[replica]
            if not client.serving():
                continue
            try:
                self.sessions[replica] = client.create_session(*self._task)
            except BackboneError as error:
                log.debug("replica %s not back yet: %s", client.address, error)
                continue
            self.pool.mark_alive(replica)

    def close(self) -> None:
        """Closes the session on the live replicas, best effort."""
        for replica in self.pool.live():
            if replica in self.sessions:
                try:
                    self.sessions[replica].close()
                except BackboneError as error:
                    log.debug("closing on %s: %s", self.pool.clients[replica].address, error)
