"""Tenants: who may call the server, and each one's limits.

An operator lists tenants in a JSON keys file (`blackbox serve --api-keys FILE`):

    {"tenants": [{"name": "a", "key_sha256": "<hex>", "quota_calls": 100000,
                  "max_sessions": 4, "max_examples": 20000}]}

The file holds each key's SHA-256 only (`blackbox keys new` prints a key once, with its
line). Without a keys file the server is open: every caller is the one tenant "open",
with no quota.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from backbone_server.errors import Unauthenticated
from blackbox.v1.auth import BEARER, METADATA_KEY, hash_key

OPEN_TENANT_NAME = "open"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TENANT_FIELDS = {"name": str, "key_sha256": str, "quota_calls": int, "max_sessions": int, "max_examples": int}


class KeysFileError(ValueError):
    """A keys file that cannot be served from, with what is wrong and where."""


@dataclass(frozen=True)
class Tenant:
    name: str
    quota_calls: int = 0  # API calls it may spend over the server's life (0: no quota)
    max_sessions: int = 0  # sessions it may hold at once (0: the server's own bound)
    max_examples: int = 0  # examples in one session, all splits together (0: the server's bound)
    key_sha256: str = ""


def open_tenant() -> Tenant:
    return Tenant(OPEN_TENANT_NAME)


def load_tenants(path: str | Path) -> dict[str, Tenant]:
    """{key_sha256: Tenant} from a keys file; every mistake is one KeysFileError."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise KeysFileError(f"cannot read the keys file {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise KeysFileError(f"{path} is not JSON: {error}") from None
    entries = document.get("tenants") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise KeysFileError(f'{path} must hold {{"tenants": [...]}} with at least one tenant')
    tenants: dict[str, Tenant] = {}
    names: set[str] = set()
    for number, entry in enumerate(entries, start=1):
        where = f"{path}, tenant {number}"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: expected an object with {', '.join(TENANT_FIELDS)}")
        unknown = set(entry) - set(TENANT_FIELDS)
        if unknown:
            raise KeysFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                                f"a tenant has {', '.join(TENANT_FIELDS)}")
        for field in ("name", "key_sha256"):
            if field not in entry:
                raise KeysFileError(f"{where}: {field} is missing")
        for field, kind in TENANT_FIELDS.items():
            value = entry.get(field, kind())
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
                raise KeysFileError(f"{where}: {field} must be {'a string' if kind is str else 'an integer >= 0'}")
        name, digest = entry["name"], entry["key_sha256"].lower()
        if not _NAME.match(name):
            raise KeysFileError(f"{where}: name must be 1 to 64 letters, digits, '_', '-' or '.'")
        if name in names:
            raise KeysFileError(f"{where}: tenant {name!r} is listed twice")
        if not _SHA256.match(digest):
            raise KeysFileError(f"{where}: key_sha256 must be 64 hex digits (the SHA-256 of the key, "
                                "as `blackbox keys new` prints it), not the key itself")
        if digest in tenants:
            raise KeysFileError(f"{where}: the same key as tenant {tenants[digest].name!r}")
        names.add(name)
        tenants[digest] = Tenant(name, entry.get("quota_calls", 0), entry.get("max_sessions", 0),
                                 entry.get("max_examples", 0), digest)
    return tenants


class TenantDirectory:
    """Who a call comes from: the tenant its key names, or the open tenant on an open server."""

    def __init__(self, tenants: dict[str, Tenant] | None = None):
        self._by_hash = dict(tenants or {})
        self._open = open_tenant()

    @property
    def keyed(self) -> bool:
        return bool(self._by_hash)

    def names(self) -> list[str]:
        return [tenant.name for tenant in self._by_hash.values()] if self.keyed else [self._open.name]

    def authenticate(self, metadata) -> Tenant:
        """The tenant of a call's metadata ((key, value) pairs); UNAUTHENTICATED without a
        known key. The message never repeats what was sent."""
        if not self.keyed:
            return self._open
        values = [value for key, value in metadata or () if key == METADATA_KEY]
        if not values:
            raise Unauthenticated("this server needs an API key: pass --api-key KEY or set $BLACKBOX_API_KEY "
                                  f"(sent as the gRPC metadata '{METADATA_KEY}: {BEARER}KEY')")
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
        if not value.startswith(BEARER):
            raise Unauthenticated(f"the '{METADATA_KEY}' metadata must read '{BEARER}KEY'")
        tenant = self._by_hash.get(hash_key(value[len(BEARER):].strip()))
        if tenant is None:
            raise Unauthenticated("the API key is not valid on this server")
        return tenant
