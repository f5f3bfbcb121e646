"""API keys as both sides see them: how a key travels (gRPC metadata) and how the server
stores it (its SHA-256, never the key itself)."""

from __future__ import annotations

import hashlib
import secrets

# gRPC metadata keys are lower case; the value is "Bearer KEY".
METADATA_KEY = "authorization"
BEARER = "Bearer "
KEY_PREFIX = "bbx_"
ENVIRONMENT_VARIABLE = "BLACKBOX_API_KEY"


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key's UTF-8 bytes: what a keys file holds as key_sha256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh key: 32 random bytes, URL-safe, with a prefix that says what it is."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `key` (none without a key)."""
    return ((METADATA_KEY, BEARER + key),) if key else ()
