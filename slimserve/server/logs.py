"""Request-scoped log context and a JSON log format.

The request interceptor sets `REQUEST_ID` and `REQUEST_FIELDS` for each RPC (contextvars,
so every log line a request's task emits carries its id); handlers add fields such as the
resolved model to `REQUEST_FIELDS`, and the interceptor's access-log line includes them.
`request_id_from` is the one rule for a caller's `x-request-id`. Only entry points call
`configure`. Imports the standard library only (the CLI imports this module).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any, Literal

LogFormat = Literal["text", "json"]

REQUEST_ID: ContextVar[str | None] = ContextVar("slimserve_request_id", default=None)
REQUEST_FIELDS: ContextVar[dict[str, Any] | None] = ContextVar(
    "slimserve_request_fields", default=None
)
#: time.monotonic() when the door took the call (its parse phase starts there).
REQUEST_T0: ContextVar[float | None] = ContextVar("slimserve_request_t0", default=None)

#: A caller's request id: 1 to 128 printable ASCII characters, no spaces (safe in any log).
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def valid_request_id(value: object) -> bool:
    """Whether `value` may be used as a request id as the caller sent it."""
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def request_id_from(metadata: Iterable[tuple[str, object]] | None) -> str:
    """The caller's `x-request-id` from gRPC metadata when valid, else a fresh id
    (32 hex digits). The first `x-request-id` counts."""
    for key, value in metadata or ():
        if key == "x-request-id":
            return value if isinstance(value, str) and valid_request_id(value) else uuid.uuid4().hex
    return uuid.uuid4().hex


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "request_id", "taskName"}
)


def annotate(**fields: Any) -> None:
    """Add fields to the current request's access-log line (no-op outside a request)."""
    current = REQUEST_FIELDS.get()
    if current is not None:
        current.update(fields)


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id ('' outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = REQUEST_ID.get() or ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "") or REQUEST_ID.get()
        if request_id:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def access(logger: logging.Logger, method: str, code: str, t0: float) -> None:
    """One access-log line for a finished call (every door writes the same shape): the
    method or route, its status, milliseconds since `t0` (monotonic) and the call's fields
    (request id, principal, model, ...)."""
    fields = REQUEST_FIELDS.get() or {}
    ms = (time.monotonic() - t0) * 1e3
    logger.info(
        "%s %s %.1fms",
        method,
        code,
        ms,
        extra={"method": method, "code": code, "ms": round(ms, 2), **fields},
    )


def configure(fmt: LogFormat = "text", level: int = logging.INFO) -> None:
    """Root logging for an entry point: text or JSON lines on stderr, request ids stamped."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
