"""Errors the engine raises; the server maps each to one status code per door.

EngineError
├── InvalidRequest     INVALID_ARGUMENT  (names the offending field)
├── UnknownModel       NOT_FOUND
├── Overloaded         RESOURCE_EXHAUSTED
├── NotReady           UNAVAILABLE       (loading, draining, restarting after a crash)
├── DeadlineExpired    DEADLINE_EXCEEDED
├── IntegrityFailure   DATA_LOSS         (an artifact fails its checksums)
├── LoadFailed         FAILED_PRECONDITION (verified files that do not make a servable model)
└── EngineFailure      INTERNAL          (an unexpected error inside an engine process)
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequest(EngineError, ValueError):
    """A request field is out of range or malformed.

    `field` is a path in the door-neutral vocabulary (`sampling.temperature`,
    `prompt.messages[2].role`), which each door renders in its own words; `reason` is the
    message without it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class UnknownModel(EngineError, LookupError):
    """The requested model, version or alias is not loaded or does not exist."""


class Overloaded(EngineError):
    """The admission queue is full."""


class NotReady(EngineError):
    """The server or model cannot take requests right now."""


class DeadlineExpired(EngineError):
    """The request's gRPC deadline passed before it finished."""


class IntegrityFailure(EngineError):
    """An artifact's files do not match its manifest."""


class LoadFailed(EngineError):
    """A version passed its checksums but could not be loaded."""


class EngineFailure(EngineError):
    """An engine process reported an error of no domain kind (its message names it)."""
