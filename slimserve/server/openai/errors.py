"""The HTTP door's errors: OpenAI error bodies with the status each domain error earns.

Domain errors take the HTTP column of the one table of error kinds (`server.errors`);
anything not in it is a 500, logged with its traceback. The door's own refusals are
`HttpError`s:

HttpError               (status, type and code of its own)
├── Unauthorized        401  a missing or wrong bearer token (the gRPC door's `Gate`)
├── PayloadTooLarge     413  a body over `Limits.max_message_bytes`
└── ClientGone          499  the client closed the connection (logged, never sent)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from slimserve.engine.errors import InvalidRequest, UnknownModel
from slimserve.server import errors

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Status:
    """An HTTP status and the OpenAI error `type` and `code` that go with it."""

    http: int
    type: str
    code: str | None = None
    #: Seconds a client should wait before retrying (the `retry-after` header); None: none.
    retry_after_s: int | None = None


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
    kind = errors.kind_of(exc)
    if kind is errors.INTERNAL:
        return INTERNAL
    return Status(kind.http, kind.type, kind.code, kind.retry_after_s)


def error_body(exc: BaseException) -> tuple[Status, dict[str, Any]]:
    """The status and `{"error": {message, type, param, code}}` body for `exc`.

    An unexpected error or an engine's failure is logged with the request id (and an
    unexpected one's traceback); the client reads "internal error (request id X)" only
    (`errors.report`). An `InvalidRequest` names its field in `param`.
    """
    status = status_for(exc)
    if isinstance(exc, HttpError) or errors.kind_of(exc).exposed:
        message = str(exc)
    else:
        errors.report(exc)
        message = errors.message(exc, {})
    param = exc.field if isinstance(exc, InvalidRequest) else getattr(exc, "param", None)
    if isinstance(exc, UnknownModel):
        param = "model"
    error = {"message": message, "type": status.type, "param": param, "code": status.code}
    return status, {"error": error}
