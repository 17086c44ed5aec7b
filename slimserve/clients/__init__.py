"""Typed gRPC clients for slimserve. Importing this package never imports torch."""

from slimserve.clients.client import AsyncClient, Client
from slimserve.clients.errors import (
    Cancelled,
    ClientError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from slimserve.clients.types import (
    ChatMessage,
    Generation,
    LabelScore,
    ModelInfo,
    Sampling,
    ScoreResult,
    StreamChunk,
    Timings,
    TokenLogprob,
)

__all__ = [
    "AsyncClient",
    "Cancelled",
    "ChatMessage",
    "Client",
    "ClientError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Generation",
    "InvalidArgument",
    "LabelScore",
    "ModelInfo",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "Sampling",
    "ScoreResult",
    "ServerError",
    "StreamChunk",
    "Timings",
    "TokenLogprob",
    "Unauthenticated",
    "Unavailable",
]
