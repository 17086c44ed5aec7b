"""What `Client` and `AsyncClient` share: credentials, metadata, the retry policy, and every
call built, ready to send, with the way to read its answer.

A subclass only sends: `Client` blocks, `AsyncClient` awaits. Imports grpc, the generated
API and the client's own modules only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slimserve.clients import _convert as convert
from slimserve.clients._convert import Prompt
from slimserve.clients._target import channel_target, is_loopback
from slimserve.clients.errors import ClientError, InsecureToken, Unavailable
from slimserve.clients.types import Generation, ModelInfo, ScoreResult
from slimserve.v1 import generation_pb2_grpc as gen_grpc
from slimserve.v1 import models_pb2 as models_pb
from slimserve.v1 import models_pb2_grpc as models_grpc

T = TypeVar("T")

_FIRST_BACKOFF_S: Final = 0.1
_HEALTH_TIMEOUT_S: Final = 5.0
_LOAD_TIMEOUT_S: Final = 600.0
WAIT_READY_POLL_S: Final = 0.2


def tls_credentials(
    *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: `ca` to trust (None = the system's roots),
    `cert` and `key` to present a client certificate (mutual TLS)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def metadata(token: str | None, request_id: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata: the bearer token and the caller's request id, where given."""
    md: list[tuple[str, str]] = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    if request_id:
        md.append(("x-request-id", request_id))
    return tuple(md)


@dataclass(frozen=True, slots=True)
class Stubs:
    """The services on one channel (the generated stubs serve sync and aio channels alike)."""

    generation: Any
    models: Any
    health: Any

    @classmethod
    def on(cls, channel: Any) -> Stubs:
        return cls(
            gen_grpc.GenerationServiceStub(channel),
            models_grpc.ModelServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )


@dataclass(frozen=True, slots=True)
class Unary(Generic[T]):
    """One unary call ready to send: the stub method it goes to, its request, deadline
    (seconds) and metadata, and `read(response, round_trip_ms)` to turn the answer into T."""

    rpc: Callable[[Stubs], Any]
    request: Any
    timeout: float | None
    metadata: tuple[tuple[str, str], ...]
    read: Callable[[Any, float], T]


@dataclass(frozen=True, slots=True)
class Stream:
    """A GenerateStream call ready to send; messages are read with `convert.to_chunk`."""

    request: Any
    timeout: float | None
    metadata: tuple[tuple[str, str], ...]


def _untimed(read: Callable[[Any], T]) -> Callable[[Any, float], T]:
    return lambda response, _ms: read(response)


def check_token_channel(
    target: str | Sequence[str],
    *,
    token: str | None,
    credentials: grpc.ChannelCredentials | None,
    allow_insecure_token: bool,
) -> None:
    """Refuse a bearer token on a plain-text channel to another host, where anyone on the
    path could read it; this host (127.0.0.0/8, ::1, localhost, a Unix socket) is fine.

    Raises:
        InsecureToken: a token, no TLS `credentials`, a target that is not this host, and
            no `allow_insecure_token`.
    """
    if token and credentials is None and not allow_insecure_token and not is_loopback(target):
        raise InsecureToken(target)


class BaseClient:
    """Connection settings, the retry policy and call building for both clients.

    `timeout` is the default deadline of a call in seconds (None = none); `retries` how many
    times a call that found the server UNAVAILABLE is tried again (streams: only before
    their first message). `token` is sent as a bearer token on every call; `credentials`
    (`tls_credentials(...)`) make the channel TLS. Without them a token would cross the
    network in clear text, so a target that is not this host is refused unless
    `allow_insecure_token` is set (see `check_token_channel`). A subclass opens the channel.

    Raises:
        InsecureToken: as `check_token_channel`; nothing is sent and no channel is opened.
    """

    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:50051",
        *,
        timeout: float | None = 60.0,
        retries: int = 3,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        allow_insecure_token: bool = False,
    ) -> None:
        check_token_channel(
            target,
            token=token,
            credentials=credentials,
            allow_insecure_token=allow_insecure_token,
        )
        address, options = channel_target(target)
        self.timeout = timeout
        self.retries = retries
        self._token = token
        self._channel = self._open_channel(address, options, credentials)
        self._stubs = Stubs.on(self._channel)

    def _open_channel(self, address: str, options: list[tuple[str, Any]], credentials: Any) -> Any:
        """A sync or aio channel to `address` (TLS when `credentials` is given)."""
        raise NotImplementedError

    def _retry_delay(self, error: ClientError, attempt: int) -> float | None:
        """Seconds to wait before trying again after `attempt` (0-based) failed, or None to
        give up: only UNAVAILABLE is retried, with exponential backoff."""
        if isinstance(error, Unavailable) and attempt < self.retries:
            return float(_FIRST_BACKOFF_S * 2**attempt)
        return None

    def _unary(
        self,
        rpc: Callable[[Stubs], Any],
        request: Any,
        read: Callable[[Any, float], T],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Unary[T]:
        deadline = timeout if timeout is not None else self.timeout
        return Unary(rpc, request, deadline, metadata(self._token, request_id), read)

    def _build_generate(
        self,
        prompt: Prompt,
        timeout: float | None,
        request_id: str | None,
        options: Mapping[str, Any],
    ) -> Unary[Generation]:
        req = convert.generate_request(prompt, **options)
        read = _untimed(convert.to_generation)
        return self._unary(
            lambda s: s.generation.Generate, req, read, timeout=timeout, request_id=request_id
        )

    def _build_stream(
        self,
        prompt: Prompt,
        timeout: float | None,
        request_id: str | None,
        options: Mapping[str, Any],
    ) -> Stream:
        req = convert.generate_request(prompt, **options)
        deadline = timeout if timeout is not None else self.timeout
        return Stream(req, deadline, metadata(self._token, request_id))

    def _build_score(
        self,
        prompt: Prompt,
        labels: Sequence[str],
        model: str,
        timeout: float | None,
        request_id: str | None,
    ) -> Unary[ScoreResult]:
        req = convert.score_request(prompt, labels, model)
        return self._unary(
            lambda s: s.generation.Score,
            req,
            convert.to_score,
            timeout=timeout,
            request_id=request_id,
        )

    def _build_tokenize(self, prompt: Prompt, model: str) -> Unary[list[int]]:
        req = convert.tokenize_request(prompt, model)
        return self._unary(lambda s: s.generation.Tokenize, req, _untimed(convert.to_token_ids))

    def _build_models(self) -> Unary[list[ModelInfo]]:
        req = models_pb.ListModelsRequest()
        return self._unary(lambda s: s.models.ListModels, req, _untimed(convert.to_model_list))

    def _build_model_info(self, model: str) -> Unary[ModelInfo]:
        req = convert.model_info_request(model)
        return self._unary(lambda s: s.models.GetModelInfo, req, _untimed(convert.to_model_info))

    def _build_load_model(self, model: str, make_default: bool, beside: bool) -> Unary[ModelInfo]:
        req = convert.load_model_request(model, make_default, beside)
        read = _untimed(lambda r: convert.to_model_info(r.model))
        return self._unary(lambda s: s.models.LoadModel, req, read, timeout=_LOAD_TIMEOUT_S)

    def _build_unload_model(self, model: str) -> Unary[None]:
        name, _, ref = model.partition("@")
        req = models_pb.UnloadModelRequest(name=name, ref=ref)
        return self._unary(lambda s: s.models.UnloadModel, req, lambda _r, _ms: None)

    def _build_health(self, service: str) -> Unary[str]:
        req = health_pb2.HealthCheckRequest(service=service)
        read = _untimed(convert.to_serving_status)
        return self._unary(lambda s: s.health.Check, req, read, timeout=_HEALTH_TIMEOUT_S)


def ready_deadline(timeout: float) -> float:
    """The `time.monotonic()` after which `wait_ready` gives up."""
    return time.monotonic() + timeout


def not_ready(timeout: float) -> Unavailable:
    return Unavailable("UNAVAILABLE", f"server not SERVING after {timeout:.0f}s")
