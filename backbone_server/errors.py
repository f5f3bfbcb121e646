"""Domain errors of the backbone, each carrying the gRPC status it maps to.

The engine and the model loader raise these; only the server's interceptor turns them
into statuses, so the engine stays usable (and testable) without gRPC.
"""

from __future__ import annotations

import grpc


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
