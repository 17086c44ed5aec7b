"""Errors the clients raise; each gRPC status code maps to one class.

ClientError
├── InvalidArgument      INVALID_ARGUMENT (a request field is wrong; `field` names it)
├── NotFound             NOT_FOUND (model, version or alias)
├── Unauthenticated      UNAUTHENTICATED
├── PermissionDenied     PERMISSION_DENIED
├── Overloaded           RESOURCE_EXHAUSTED (retry later)
├── Unavailable          UNAVAILABLE (server down, loading or draining)
├── DeadlineExceeded     DEADLINE_EXCEEDED
├── Cancelled            CANCELLED
├── DataLoss             DATA_LOSS (an artifact failed its checksums)
├── ServerError          INTERNAL and anything else
│   └── FailedPrecondition FAILED_PRECONDITION
└── InsecureToken        raised by the client itself, before any connection: a bearer
                         token would cross the network in clear text
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc


class ClientError(Exception):
    """Base class; `code` is the gRPC status code name, `details` the server's message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by its fields, not its constructor's arguments (which subclasses change):
        # errors cross process lines (multiprocessing, Ray workers) as themselves.
        return _rebuild, (type(self), self.__dict__)


class InvalidArgument(ClientError):
    @property
    def field(self) -> str:
        """The request field the server named (text before the first ': ')."""
        return self.details.split(":", 1)[0] if ":" in self.details else ""


class NotFound(ClientError): ...


class Unauthenticated(ClientError): ...


class PermissionDenied(ClientError): ...


class Overloaded(ClientError): ...


class Unavailable(ClientError): ...


class DeadlineExceeded(ClientError): ...


class Cancelled(ClientError): ...


class DataLoss(ClientError): ...


class ServerError(ClientError): ...


class FailedPrecondition(ServerError):
    """The system is not in a state the call needs: a version that could not be loaded, or
    a model that does not fit the client. A ServerError, as it was before it had a class."""


class InsecureToken(ClientError):
    """A bearer token was given for a plain-text channel to another host, where anyone on
    the path could read it. Use TLS (`credentials=tls_credentials(...)`), or pass
    `allow_insecure_token=True` where the network is trusted (a private mesh that encrypts).
    """

    def __init__(self, target: str | Sequence[str]) -> None:
        super().__init__(
            "FAILED_PRECONDITION",
            f"refusing to send a bearer token without TLS to {target!r}, which is not this "
            "host: pass credentials=tls_credentials(ca=...) (the CLI: --tls-ca), or "
            "allow_insecure_token=True if the network between is trusted",
        )
        self.target = target


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def _rebuild(cls: type[ClientError], fields: dict[str, Any]) -> ClientError:
    error = cls.__new__(cls)
    error.__dict__.update(fields)
    Exception.__init__(error, f"{error.code}: {error.details}")
    return error


def from_rpc_error(err: Any) -> ClientError:
    """Turn a grpc.RpcError / grpc.aio.AioRpcError into the matching ClientError."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    cls = _BY_CODE.get(code, ServerError)
    return cls(code.name if code is not None else "UNKNOWN", details)
