"""Typed gRPC clients for slimserve: `Client` (blocking) and `AsyncClient` (asyncio), on one
`BaseClient` that builds every call, so both offer the same methods and retry policy.

Results are dataclasses from `slimserve.clients.types`; failures are `ClientError` subclasses
from `slimserve.clients.errors`, never raw `grpc.RpcError`s. Unary calls are retried on
UNAVAILABLE with exponential backoff; streams only before their first message arrives.

Imports grpc, protobuf and `slimserve.v1` only, so it never imports torch.
"""

from slimserve.clients._base import BaseClient, tls_credentials
from slimserve.clients._convert import Prompt
from slimserve.clients._target import channel_target
from slimserve.clients.aio import AsyncClient
from slimserve.clients.errors import (
    Cancelled,
    ClientError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InsecureToken,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from slimserve.clients.sync import Client
from slimserve.clients.types import (
    ChatMessage,
    Generation,
    LabelScore,
    ModelInfo,
    Sampling,
    ScoreResult,
    StreamChunk,
    Structured,
    Timings,
    TokenLogprob,
)

__all__ = [
    "AsyncClient",
    "BaseClient",
    "Cancelled",
    "ChatMessage",
    "Client",
    "ClientError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Generation",
    "InsecureToken",
    "InvalidArgument",
    "LabelScore",
    "ModelInfo",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "Prompt",
    "Sampling",
    "ScoreResult",
    "ServerError",
    "StreamChunk",
    "Structured",
    "Timings",
    "TokenLogprob",
    "Unauthenticated",
    "Unavailable",
    "channel_target",
    "tls_credentials",
]
