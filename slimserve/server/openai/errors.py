"""The HTTP door's errors: OpenAI error bodies with the status each domain error earns.

`STATUS` is the one table from domain errors to HTTP statuses (the gRPC door's is
`servicer.STATUS`); anything not in it is a 500, logged with its traceback. The door's
own refusals are `HttpError`s:

HttpError               (status, type and code of its own)
├── Unauthorized        401  a missing or wrong bearer token (the gRPC door's `Gate`)
├── PayloadTooLarge     413  a body over `Limits.max_message_bytes`
└── ClientGone          499  the client closed the connection (logged, never sent)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from slimserve.engine.errors import (
    DeadlineExpired,
    EngineFailure,
    IntegrityFailure,
    InvalidRequest,
    LoadFailed,
    NotReady,
    Overloaded,
    UnknownModel,
)
from slimserve.registry.errors import IntegrityError, RegistryError
from slimserve.server.logs import REQUEST_ID

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Status:
    """An HTTP status and the OpenAI error `type` and `code` that go with it."""

    http: int
    type: str
    code: str | None = None
    #: Seconds a client should wait before retrying (the `retry-after` header); None: none.
    retry_after_s: int | None = None


# The one table from domain errors to HTTP statuses; first match wins.
STATUS: tuple[tuple[type[BaseException], Status], ...] = (
    (InvalidRequest, Status(400, "invalid_request_error")),
    (UnknownModel, Status(404, "invalid_request_error", "model_not_found")),
    (Overloaded, Status(429, "rate_limit_error", "queue_full", retry_after_s=1)),
    (NotReady, Status(503, "service_unavailable", "not_ready", retry_after_s=1)),
    (IntegrityFailure, Status(500, "server_error", "data_loss")),
    (DeadlineExpired, Status(504, "timeout_error")),
    (EngineFailure, Status(500, "server_error", "engine_failure")),
    (IntegrityError, Status(500, "server_error", "data_loss")),
    (LoadFailed, Status(500, "server_error", "load_failed")),
    # Other registry errors (a bad name or alias in `model`) are the caller's to fix.
    (RegistryError, Status(400, "invalid_request_error")),
)
INTERNAL = Status(500, "server_error", "internal_error")


class HttpError(Exception):
    """A refusal of the HTTP door itself, with the status it is sent with."""

    status = INTERNAL

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Unauthorized(HttpError):
    status = Status(401, "authentication_error", "invalid_api_key")


class PayloadTooLarge(HttpError):
    status = Status(413, "invalid_request_error", "payload_too_large")


class ClientGone(HttpError):
    status = Status(499, "client_closed_request")


def status_for(exc: BaseException) -> Status:
    if isinstance(exc, HttpError):
        return exc.status
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return INTERNAL


def error_body(exc: BaseException) -> tuple[Status, dict[str, Any]]:
    """The status and `{"error": {message, type, param, code}}` body for `exc`.

    An unexpected error or an engine's failure is logged with the request id (and an
    unexpected one's traceback); the client reads "internal error (request id X)" only.
    An `InvalidRequest` names its field in `param`.
    """
    status = status_for(exc)
    if status.http == 500 and status.code != "data_loss":  # detail in the log, with the id
        rid = REQUEST_ID.get() or "-"
        engine = isinstance(exc, EngineFailure | LoadFailed)
        log.error("internal error (request id %s): %s", rid, exc, exc_info=None if engine else exc)
        message = f"internal error (request id {rid})"
    else:
        message = str(exc)
    param = exc.field if isinstance(exc, InvalidRequest) else getattr(exc, "param", None)
    if isinstance(exc, UnknownModel):
        param = "model"
    error = {"message": message, "type": status.type, "param": param, "code": status.code}
    return status, {"error": error}
