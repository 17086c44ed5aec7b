"""Server interceptors: request context (id, size limit, access log, drain count) and auth.

`RequestInterceptor` runs first for every slimserve RPC: it takes the request id from
`x-request-id` metadata (or makes one), refuses an oversized or unparsable message with
INVALID_ARGUMENT instead of gRPC's UNKNOWN, counts calls in flight for a graceful drain,
and writes one access-log line. `AuthInterceptor` checks bearer tokens. Health checks and
reflection pass through both untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # no public name for it

from slimserve.server import logs
from slimserve.server.config import AuthConfig
from slimserve.server.metrics import Metrics

log = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

#: Methods anyone may call: probes must work without credentials.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
#: Model control: needs an admin token whenever authentication is on.
ADMIN_METHODS = frozenset(
    {"/slimserve.v1.ModelService/LoadModel", "/slimserve.v1.ModelService/UnloadModel"}
)
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII: safe in any log


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
    def __init__(self, max_message_bytes: int, metrics: Metrics, in_flight: InFlight) -> None:
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        self.in_flight = in_flight

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_streaming or method.startswith(OPEN_PREFIXES):
            return handler
        rid = _metadata(handler_call_details, "x-request-id")
        if rid is None or not _REQUEST_ID.fullmatch(rid):
            rid = uuid.uuid4().hex
        return _rebuild(
            handler,
            self._wrap(handler, method, rid),
            self._deserializer(handler.request_deserializer, method),
        )

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

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str, rid: str) -> Callable[..., Any]:
        behavior = getattr(handler, _kind(handler))
        short = method.rsplit("/", 1)[-1]

        async def begin(request: Any, context: grpc.aio.ServicerContext) -> float:
            logs.REQUEST_ID.set(rid)
            logs.REQUEST_FIELDS.set({})
            self.in_flight.started()
            context.add_done_callback(lambda _: self.in_flight.ended())
            if self.in_flight.closing:
                self._access(short, "UNAVAILABLE", time.monotonic())
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            if isinstance(request, _Rejected):
                self._access(short, "INVALID_ARGUMENT", time.monotonic())
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return time.monotonic()

        if handler.response_streaming and inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                t0 = await begin(request, context)
                code = "OK"
                try:
                    async for msg in behavior(request, context):
                        yield msg
                except BaseException as exc:
                    code = _code_of(exc, context)
                    raise
                finally:
                    self._access(short, code, t0)

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = await begin(request, context)
            code = "OK"
            try:
                return await behavior(request, context)
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                self._access(short, code, t0)

        return unary

    def _access(self, method: str, code: str, t0: float) -> None:
        self.metrics.rpc(method, code)
        fields = logs.REQUEST_FIELDS.get() or {}
        ms = (time.monotonic() - t0) * 1e3
        log.info(
            "%s %s %.1fms",
            method,
            code,
            ms,
            # Not context.peer(): on a call the client already cancelled, grpcio 1.85
            # dereferences a freed call and the process segfaults.
            extra={"method": method, "code": code, "ms": round(ms, 2), **fields},
        )


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


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """`authorization: Bearer <token>`; tokens are compared as digests in constant time."""

    def __init__(self, auth: AuthConfig) -> None:
        self._user = [_digest(t) for t in auth.tokens]
        self._admin = [_digest(t) for t in auth.admin_tokens]

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        refusal = self._check(_metadata(handler_call_details, "authorization"), method)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        code, message = refusal

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, message)

        return _rebuild(handler, refuse, lambda _data: None)  # the body is never parsed

    def _check(self, header: str | None, method: str) -> tuple[grpc.StatusCode, str] | None:
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        if header is None:
            if method not in ADMIN_METHODS and not self._user:
                return None  # only model control is protected
            return unauthenticated, "missing 'authorization: Bearer <token>' metadata"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return unauthenticated, "the authorization metadata must be 'Bearer <token>'"
        digest = _digest(token.strip())
        if _matches(digest, self._admin):
            return None
        is_user = _matches(digest, self._user)
        if method not in ADMIN_METHODS:
            return None if is_user or not self._user else (unauthenticated, "invalid token")
        if is_user:
            why = "needs the admin token" if self._admin else "is disabled: no admin token is set"
            return grpc.StatusCode.PERMISSION_DENIED, f"model control {why}"
        return unauthenticated, "invalid token"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _matches(digest: bytes, known: Sequence[bytes]) -> bool:
    found = False
    for candidate in known:  # no early exit: the time does not depend on which matched
        found |= hmac.compare_digest(digest, candidate)
    return found
