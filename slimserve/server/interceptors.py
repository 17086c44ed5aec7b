"""The server's interceptor: request context (id, size limit, drain count), the access
gate (bearer tokens, model control) and the access log.

`RequestInterceptor` runs for every slimserve RPC: it takes the request id from
`x-request-id` metadata (`logs.request_id_from`), asks the `Gate` who the caller is and
whether it may call the method, refuses an oversized or unparsable message with
INVALID_ARGUMENT instead of gRPC's UNKNOWN, counts calls in flight for a graceful drain,
and writes one access-log line naming the caller's principal (a token's label, or
`anonymous`; never a token). Health checks and reflection pass through untouched.
Imports grpc and `slimserve.server.{config,logs,metrics}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # no public name for it

from slimserve.server import logs
from slimserve.server.config import ANONYMOUS, AuthConfig, ServerConfig
from slimserve.server.metrics import Metrics

log = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

#: Methods anyone may call: probes must work without credentials.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
#: Model control: needs an admin token, or `allow_model_control` where none is set.
ADMIN_METHODS = frozenset(
    {"/slimserve.v1.ModelService/LoadModel", "/slimserve.v1.ModelService/UnloadModel"}
)
Refusal = tuple[grpc.StatusCode, str]


def server_interceptors(
    config: ServerConfig, metrics: Metrics, in_flight: InFlight
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors `build_server` installs, always (with or without tokens)."""
    if config.plaintext_tokens:
        log.warning(
            "bearer tokens are accepted on %s without TLS (--allow-insecure-tokens): they "
            "cross the network in plaintext",
            config.host,
        )
    gate = Gate(config.auth, allow_model_control=config.allow_model_control)
    return [RequestInterceptor(config.limits.max_message_bytes, metrics, in_flight, gate)]


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key and isinstance(v, str):
            return v
    return None


def _kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def _rebuild(
    handler: grpc.RpcMethodHandler, behavior: Callable[..., Any], deserializer: Any
) -> grpc.RpcMethodHandler:
    make = getattr(grpc, f"{_kind(handler)}_rpc_method_handler")
    handler_out: grpc.RpcMethodHandler = make(
        behavior,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )
    return handler_out


class _Rejected:
    """What the wrapped deserializer returns for a request it will not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class InFlight:
    """Counts slimserve RPCs that have not terminated, for a graceful drain; once `closing`,
    new ones are refused with UNAVAILABLE by `RequestInterceptor`."""

    def __init__(self) -> None:
        self.count = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def started(self) -> None:
        self.count += 1
        self._idle.clear()

    def ended(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once nothing is in flight, False if `timeout` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class RequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self, max_message_bytes: int, metrics: Metrics, in_flight: InFlight, gate: Gate
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        self.in_flight = in_flight
        self.gate = gate

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        principal, refusal = self.gate.check(
            _metadata(handler_call_details, "authorization"), method
        )
        if refusal is not None:  # the body of a refused call is never parsed
            handler = _rebuild(handler, _refuser(refusal), lambda _data: None)
        rid = logs.request_id_from(handler_call_details.invocation_metadata)
        wrapped = self._wrap(handler, method, rid, principal)
        if wrapped is None:
            return handler
        return _rebuild(handler, wrapped, self._deserializer(handler.request_deserializer, method))

    def _deserializer(self, inner: Any, method: str) -> Callable[[bytes], Any]:
        limit = self.max_message_bytes
        type_name = method.rsplit("/", 1)[-1] + " request"

        def deserialize(data: bytes) -> Any:
            if len(data) > limit:
                return _Rejected(
                    f"request: {len(data)} bytes is over the limit max_message_bytes={limit}"
                )
            try:
                return inner(data) if inner is not None else data
            except Exception as exc:  # DecodeError: malformed bytes, invalid UTF-8
                return _Rejected(f"request: not a valid {type_name}: {exc}")

        return deserialize

    def _wrap(
        self, handler: grpc.RpcMethodHandler, method: str, rid: str, principal: str
    ) -> Callable[..., Any] | None:
        """The handler with every call's start (`_begin`) and one access-log line around
        it; a request stream (KServe's ModelStreamInfer) also has each message held to the
        size limit. None for a kind this server does not use (a client stream)."""
        behavior = getattr(handler, _kind(handler))
        short = method.rsplit("/", 1)[-1]
        streams_out = handler.response_streaming and inspect.isasyncgenfunction(behavior)
        if handler.request_streaming and not streams_out:
            return None

        async def begin(request: Any, context: grpc.aio.ServicerContext) -> tuple[float, Any]:
            """Start the call; returns its start time and what the behaviour is given."""
            if handler.request_streaming:
                t0 = await self._begin(None, context, method, rid, principal)
                return t0, _checked(request, context)
            return await self._begin(request, context, method, rid, principal), request

        if streams_out:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                t0, given = await begin(request, context)
                code = "OK"
                try:
                    async for msg in behavior(given, context):
                        yield msg
                except BaseException as exc:
                    code = _code_of(exc, context)
                    raise
                finally:
                    self._access(short, code, t0)

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0, given = await begin(request, context)
            code = "OK"
            try:
                return await behavior(given, context)
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                self._access(short, code, t0)

        return unary

    async def _begin(
        self, request: Any, context: grpc.aio.ServicerContext, method: str, rid: str, principal: str
    ) -> float:
        """Every call's start: its id and principal for the log, the drain, the size limit."""
        short = method.rsplit("/", 1)[-1]
        logs.REQUEST_T0.set(time.monotonic())
        logs.REQUEST_ID.set(rid)
        logs.REQUEST_FIELDS.set({"principal": principal, **_control_target(method, request)})
        self.in_flight.started()
        context.add_done_callback(lambda _: self.in_flight.ended())
        if self.in_flight.closing:
            self._access(short, "UNAVAILABLE", time.monotonic())
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if isinstance(request, _Rejected):
            self._access(short, "INVALID_ARGUMENT", time.monotonic())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return time.monotonic()

    def _access(self, method: str, code: str, t0: float) -> None:
        self.metrics.rpc(method, code)
        # No context.peer() in the line: on a call the client already cancelled, grpcio 1.85
        # dereferences a freed call and the process segfaults.
        logs.access(log, method, code, t0)


async def _checked(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    """A request stream whose messages each passed the size limit and parsed."""
    async for request in requests:
        if isinstance(request, _Rejected):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"  # the client went away or its deadline passed
    if isinstance(exc, grpc.aio.AbortError):  # raised by context.abort: the call is live
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return str(code.name)
    if isinstance(exc, ExecuteBatchError):
        # Sending the status failed: the client had already gone (cancelled, or its deadline
        # passed) while the handler was answering. Nothing reached anyone; count it as such.
        return "CANCELLED"
    return "UNKNOWN"


def _control_target(method: str, request: Any) -> dict[str, str]:
    """For model control, the model asked for (`requested` in the access log)."""
    name = getattr(request, "name", None)
    if method not in ADMIN_METHODS or not isinstance(name, str):
        return {}
    ref = getattr(request, "ref", "")
    return {"requested": f"{name}@{ref}" if ref else name}


def _refuser(refusal: Refusal) -> Callable[..., Awaitable[None]]:
    code, message = refusal

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return refuse


class Gate:
    """Who a call's `authorization: Bearer <token>` names, and whether it may call a method.

    Tokens are compared as SHA-256 digests in constant time. With user tokens set, every
    slimserve RPC needs a valid one; with only admin tokens, generation is open. Model
    control needs an admin token; where none is set it is refused with PERMISSION_DENIED
    unless `allow_model_control`, which opens it to every caller that may generate.
    """

    def __init__(self, auth: AuthConfig, *, allow_model_control: bool = False) -> None:
        self._user = [(_digest(t), auth.label_of(t)) for t in auth.tokens - auth.admin_tokens]
        self._admin = [(_digest(t), auth.label_of(t)) for t in auth.admin_tokens]
        self._allow_model_control = allow_model_control

    def check(self, header: str | None, method: str) -> tuple[str, Refusal | None]:
        """(the principal to log, the refusal or None when the call may proceed)."""
        principal, role, problem = self._identify(header)
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED, problem
        if method not in ADMIN_METHODS:
            return principal, unauthenticated if self._user and role is None else None
        if role == "admin":
            return principal, None
        if self._admin:
            if role == "user":
                return principal, (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "model control needs the admin token",
                )
            return principal, unauthenticated
        if self._user and role is None:
            return principal, unauthenticated
        if self._allow_model_control:
            return principal, None
        return principal, (
            grpc.StatusCode.PERMISSION_DENIED,
            "model control is disabled: no admin token is set; configure one "
            "(--admin-token-file or $SLIMSERVE_ADMIN_TOKEN) or start the server with "
            "--allow-model-control",
        )

    def _identify(self, header: str | None) -> tuple[str, str | None, str]:
        """(principal, "admin" | "user" | None, why a call without a role is refused)."""
        if header is None:
            return ANONYMOUS, None, "missing 'authorization: Bearer <token>' metadata"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return ANONYMOUS, None, "the authorization metadata must be 'Bearer <token>'"
        digest = _digest(token.strip())
        for role, known in (("admin", self._admin), ("user", self._user)):
            label = _find(digest, known)
            if label is not None:
                return label, role, ""
        return ANONYMOUS, None, "invalid token"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _find(digest: bytes, known: Sequence[tuple[bytes, str]]) -> str | None:
    found = None
    for candidate, label in known:  # no early exit: the time does not depend on which matched
        if hmac.compare_digest(digest, candidate):
            found = label
    return found
