"""Domain errors of the backbone, each carrying the gRPC status it maps to.

The engine and the model loader raise these; only the server's interceptor turns them
into statuses, so the engine stays usable (and testable) without gRPC.
"""

from __future__ import annotations

import grpc

SHOWN_CHARS = 60  # what an error message shows of a client's text or list


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """A client's string or list as an error message may show it: its repr, cut to about
    `limit` characters, saying how long it was. A long list is never formatted whole."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value):,} characters)"
    parts: list[str] = []
    size = 0
    for item in value:
        text = shown(item, limit) if isinstance(item, str) else repr(item)[:limit]
        if parts and size + len(text) > limit:
            return "[" + ", ".join(parts) + f", ...] ({len(value):,} entries)"
        parts.append(text)
        size += len(text) + 2
    return "[" + ", ".join(parts) + "]"


class ServiceError(Exception):
    """Base class: an error the caller can act on, with a message safe to show."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(ServiceError):
    """The caller went away (its deadline passed or it cancelled): the work stops early."""

    code = grpc.StatusCode.CANCELLED
