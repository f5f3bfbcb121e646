"""What the server keeps across restarts, in one SQLite file: each tenant's metered use
and the deltas it stored (SaveDelta: tiny records, a z and what it takes to use it).

Replicas may share the file (SQLite's write-ahead log serialises their writers), and then
share each tenant's quota. Without a file (`path` None) the store lives in memory, for
embedded servers and tests.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from backbone_server.errors import InvalidArgument, NotFound, ResourceExhausted, shown
from backbone_server.tenants import Tenant


SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT PRIMARY KEY,
    calls INTEGER NOT NULL DEFAULT 0,     -- candidates scored, one per candidate per request
    examples INTEGER NOT NULL DEFAULT 0   -- candidate x example pairs scored
);
CREATE TABLE IF NOT EXISTS deltas (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    record BLOB NOT NULL,                 -- a serialised blackbox.v1.StoredDelta
    saved REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
"""


@dataclass(frozen=True)
class Use:
    calls: int
    examples: int


class ServerStore:
    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit (isolation_level None): every statement is its own transaction unless
        # begun explicitly; the lock serialises this process's threads on one connection.
        self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                                   isolation_level=None, timeout=30)
        if self.path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}  # calls reserved by requests still running

    def use(self, tenant: str) -> Use:
        with self._lock:
            return self._use(tenant)

    def _use(self, tenant: str) -> Use:
        row = self._db.execute("SELECT calls, examples FROM usage WHERE tenant = ?", (tenant,)).fetchone()
        return Use(*row) if row else Use(0, 0)

    def all_use(self) -> dict[str, Use]:
        with self._lock:
            return {tenant: Use(calls, examples)
                    for tenant, calls, examples in self._db.execute("SELECT tenant, calls, examples FROM usage")}

    @contextmanager
    def metered(self, tenant: Tenant, calls: int, examples: int) -> Iterator[None]:
        """Runs a request of `calls` API calls within the tenant's quota: refused with
        RESOURCE_EXHAUSTED (naming the quota) when it would pass it, counted when it
        succeeds, not counted when it fails."""
        with self._lock:
            if tenant.quota_calls:
                spent = self._use(tenant.name).calls + self._in_flight.get(tenant.name, 0)
                if spent + calls > tenant.quota_calls:
                    raise ResourceExhausted(
                        f"tenant {tenant.name!r} has used {spent} of its {tenant.quota_calls} API calls (quota_calls); "
                        f"this request needs {calls}; ask the operator for a larger quota")
            self._in_flight[tenant.name] = self._in_flight.get(tenant.name, 0) + calls
        try:
            yield
        except BaseException:
            self._release(tenant.name, calls)
            raise
        with self._lock:
            self._in_flight[tenant.name] -= calls
            self._db.execute(
                "INSERT INTO usage (tenant, calls, examples) VALUES (?, ?, ?) ON CONFLICT (tenant) DO UPDATE "
                "SET calls = calls + excluded.calls, examples = examples + excluded.examples",
                (tenant.name, calls, examples))

    def _release(self, tenant: str, calls: int) -> None:
        with self._lock:
            self._in_flight[tenant] -= calls

    # ---- stored deltas ----------------------------------------------------------------

    def save_delta(self, tenant: str, name: str, record: bytes, saved: float, overwrite: bool,
                   max_deltas: int) -> None:
        with self._lock:
            exists = self._db.execute("SELECT 1 FROM deltas WHERE tenant = ? AND name = ?", (tenant, name)).fetchone()
            if exists and not overwrite:
                raise InvalidArgument(f"a delta named {name!r} is stored already; pass overwrite to replace it")
            if not exists:
                (count,) = self._db.execute("SELECT COUNT(*) FROM deltas WHERE tenant = ?", (tenant,)).fetchone()
                if count >= max_deltas:
                    raise ResourceExhausted(f"tenant {tenant!r} stores {count} deltas, the limit; delete one first")
            self._db.execute("INSERT OR REPLACE INTO deltas (tenant, name, record, saved) VALUES (?, ?, ?, ?)",
                             (tenant, name, record, saved))

    def load_delta(self, tenant: str, name: str) -> bytes:
        with self._lock:
            row = self._db.execute("SELECT record FROM deltas WHERE tenant = ? AND name = ?",
                                   (tenant, name)).fetchone()
        if row is None:
            raise NotFound(f"no stored delta {shown(name)}")
        return row[0]

    def list_deltas(self, tenant: str) -> list[bytes]:
        with self._lock:
            return [row[0] for row in self._db.execute(
                "SELECT record FROM deltas WHERE tenant = ? ORDER BY name", (tenant,))]

    def delete_delta(self, tenant: str, name: str) -> None:
        with self._lock:
            deleted = self._db.execute("DELETE FROM deltas WHERE tenant = ? AND name = ?", (tenant, name)).rowcount
        if not deleted:
            raise NotFound(f"no stored delta {shown(name)}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
