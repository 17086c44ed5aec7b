"""The one table of error kinds, with a column per door.

Every door answers a domain error the way this table says: gRPC (and KServe, which is
gRPC) with a status code, the OpenAI HTTP door with a status, an OpenAI error `type` and
`code`, and a `retry-after` for the kinds worth retrying. First match wins; anything not in
the table is an internal error, logged with its traceback. An internal error, and an
engine's failure, reaches the client as "internal error (request id X)" only: the detail
(which may hold anything: a native library's words, a path) is the server log's, under
that request id (`report`).

A door's own refusals (a bad bearer token, a body too large, a client gone) are its own
business (`server/openai/errors.py`, the gRPC interceptor); what the engine and the
door-neutral layer raise is all here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

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
class Kind:
    """How each door answers one kind of error."""

    grpc: grpc.StatusCode
    http: int
    #: The OpenAI error object's `type` and `code`.
    type: str
    code: str | None = None
    #: Seconds a client should wait before retrying (`retry-after`); None: do not say.
    retry_after_s: int | None = None
    #: Whether the error's own message may go to the client (else a generic one does).
    exposed: bool = True


ERRORS: tuple[tuple[type[BaseException], Kind], ...] = (
    (InvalidRequest, Kind(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")),
    (
        UnknownModel,
        Kind(grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error", "model_not_found"),
    ),
    (
        Overloaded,
        Kind(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", "queue_full", 1),
    ),
    (NotReady, Kind(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable", "not_ready", 1)),
    (IntegrityFailure, Kind(grpc.StatusCode.DATA_LOSS, 500, "server_error", "data_loss")),
    (DeadlineExpired, Kind(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error")),
    (
        EngineFailure,
        Kind(grpc.StatusCode.INTERNAL, 500, "server_error", "engine_failure", exposed=False),
    ),
    (IntegrityError, Kind(grpc.StatusCode.DATA_LOSS, 500, "server_error", "data_loss")),
    (LoadFailed, Kind(grpc.StatusCode.FAILED_PRECONDITION, 500, "server_error", "load_failed")),
    # Other registry errors (a bad name or alias in a request) are the caller's to fix.
    (RegistryError, Kind(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")),
)
INTERNAL = Kind(grpc.StatusCode.INTERNAL, 500, "server_error", "internal_error", exposed=False)


def kind_of(exc: BaseException) -> Kind:
    for cls, kind in ERRORS:
        if isinstance(exc, cls):
            return kind
    return INTERNAL


def field_name(exc: BaseException, names: dict[str, str]) -> str | None:
    """The field an `InvalidRequest` names, in a door's words: `names` maps a neutral
    field (or its first part: `prompt.messages` for `prompt.messages[2].role`) to the
    door's; an unmapped field keeps its neutral name."""
    if not isinstance(exc, InvalidRequest):
        return None
    return rename(exc.field, names)


def rename(field: str, names: dict[str, str]) -> str:
    """`field` with its longest mapped prefix replaced (a prefix ends at `.` or `[`)."""
    best = ""
    for neutral in names:
        if (field == neutral or field.startswith((f"{neutral}.", f"{neutral}["))) and len(
            neutral
        ) > len(best):
            best = neutral
    return names[best] + field[len(best) :] if best else field


def message(exc: BaseException, names: dict[str, str]) -> str:
    """`exc`'s message for a client: an `InvalidRequest` as "field: reason" in the door's
    words; other kinds as they are, or a generic line for an internal error."""
    if isinstance(exc, InvalidRequest):
        return f"{rename(exc.field, names)}: {exc.reason}"
    if not kind_of(exc).exposed:
        return f"internal error (request id {REQUEST_ID.get() or '-'})"
    return str(exc)


def report(exc: BaseException) -> None:
    """Log an error whose detail the client is not sent (`Kind.exposed` false), with the
    request id the client was given: an engine's failure as one line, anything else (a
    bug) with its traceback. Nothing for the other kinds."""
    if kind_of(exc).exposed:
        return
    rid = REQUEST_ID.get() or "-"
    trace = None if isinstance(exc, EngineFailure) else exc
    log.error(
        "internal error (request id %s): %s: %s", rid, type(exc).__name__, exc, exc_info=trace
    )
