"""Errors the service raises; `servicer` maps each to one gRPC status code.

ServiceError
├── InvalidRequest     INVALID_ARGUMENT  (names the offending field)
├── ModelNotFound      NOT_FOUND
├── Overloaded         RESOURCE_EXHAUSTED
├── NotReady           UNAVAILABLE       (loading, draining, shutting down)
└── IntegrityFailure   DATA_LOSS         (an artifact fails its checksums)
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of every error the service raises on purpose."""


class InvalidRequest(ServiceError, ValueError):
    """A request field is out of range or malformed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(ServiceError, LookupError):
    """The requested model, version or alias is not loaded or does not exist."""


class Overloaded(ServiceError):
    """The admission queue is full."""


class NotReady(ServiceError):
    """The server or model cannot take requests right now."""


class DeadlineExpired(ServiceError):
    """The request's gRPC deadline passed before it finished."""


class IntegrityFailure(ServiceError):
    """An artifact's files do not match its manifest."""
