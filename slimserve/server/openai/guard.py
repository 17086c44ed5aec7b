"""The HTTP door's transport guard: the routes see only complete, well-addressed JSON
requests from clients that send at a reasonable pace.

Two layers, because uvicorn has neither a request-header timeout nor a connection cap of
its own (encode/uvicorn#157: a client trickling one header byte at a time holds a
connection for good), and ASGI middleware only runs once the headers are in:

- `guarded_protocol`: uvicorn's HTTP protocol with a deadline for each request's headers
  (from the connection's start, or from the end of the previous response on a kept-alive
  connection), a cap on their size and a cap on open connections. A connection that misses
  them is answered 408 / 431 / 503 and closed.
- `guard`, ASGI middleware around the routes: the Host allow-list (a DNS-rebinding page
  sends its own name), CORS (off unless origins are configured; Starlette's
  `CORSMiddleware`), a JSON content type on POST (415: a cross-site form cannot send one
  without a preflight), and the body read whole within its deadline and size (408, 413)
  before a route sees it. A client that leaves mid-body costs one log line (499).

Every refusal is one log line and one `slimserve_http_requests` count; none reaches the
routes, the drain count or the engines.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from slimserve.server.config import HttpTransport

log = logging.getLogger(__name__)

#: Seconds a refused connection is still read (and the bytes dropped) before it closes.
LINGER_S = 2.0
#: Methods whose body the guard reads (and whose content type must be JSON).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: Headers a cross-origin page may send and read, when CORS is on.
EXPOSED = ["x-request-id", "x-slimserve-model", "x-slimserve-model-digest", "retry-after"]
#: `on_refused(route, status)`: the door's metrics hear of every refusal.
Refused = Callable[[str, int], None]


def _error(status: int, message: str, param: str | None, code: str) -> tuple[int, bytes]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return status, json.dumps(body).encode()


_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    503: "Service Unavailable",
}


# ---- the transport: headers, connections --------------------------------------------------
class _Deadlines:
    """Mixed into uvicorn's HTTP protocol (httptools or h11, whichever `auto` picks): it
    reads only what both keep, `self.cycle` and the shared `self.connections`."""

    transport_settings: HttpTransport
    on_refused: Refused
    connections: set[Any]
    cycle: Any
    transport: Any
    client: Any

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._received = 0  # bytes of the request head now arriving
        self._tail = b""  # its last bytes: a blank line may straddle two reads
        self._request: Any = None  # the cycle whose headers were last complete
        if len(self.connections) > self.transport_settings.max_connections:
            self._refuse(503, "too many open connections; retry shortly", "too_many_connections")
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped while the refusal lingers (see `_refuse`)
        if self._awaiting_headers():
            # Only the head counts: a body may follow in the same read.
            window = self._tail + data
            end = window.find(b"\r\n\r\n")
            self._received += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            self._tail = window[-3:]
            if self._received > self.transport_settings.max_header_bytes:
                limit = self.transport_settings.max_header_bytes
                self._refuse(431, f"request headers over {limit} bytes", "headers_too_large")
                return
        super().data_received(data)  # type: ignore[misc]
        cycle = self.cycle
        if cycle is not None and cycle is not self._request:  # a request's headers are in
            self._request = cycle
            self._received = 0
            self._disarm()  # its body has the ASGI guard's deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm()  # the next request's headers, on a kept-alive connection

    def _awaiting_headers(self) -> bool:
        cycle = self.cycle
        return cycle is None or (cycle is self._request and cycle.response_complete)

    def _arm(self) -> None:
        self._disarm()
        self._received = 0
        self._tail = b""
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.transport_settings.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if not self._awaiting_headers() or self.transport.is_closing():
            return
        if self._received == 0:  # an idle connection: closed, as keep-alive would
            self.transport.close()
            return
        timeout = self.transport_settings.header_timeout_s
        self._refuse(408, f"request headers not complete within {timeout:g} s", "timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        _, body = _error(status, message, None, code)
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
        )
        if status == 503:
            head += "retry-after: 1\r\n"
        self.transport.write(head.encode() + b"\r\n" + body)
        self._disarm()
        # A lingering close, as nginx's: closing with unread bytes in the socket would send
        # a reset that can destroy the answer before the client reads it. So the write
        # side is shut, what still comes is read and dropped, and the socket closes when the
        # client does, or after LINGER_S.
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
        peer = _peer(self.client)
        log.info("http %d from %s: %s", status, peer, message)
        self.on_refused("transport", status)


def guarded_protocol(settings: HttpTransport, on_refused: Refused) -> type[Any]:
    """uvicorn's HTTP protocol class with `settings`' header deadline and caps."""
    return type(
        "GuardedHTTPProtocol",
        (_Deadlines, AutoHTTPProtocol),
        {"transport_settings": settings, "on_refused": staticmethod(on_refused)},
    )


# ---- the requests: host, CORS, content type, body -----------------------------------------
def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request's `Host` may reach the routes. Loopback names and IP literals
    always may: a DNS-rebinding page is served under a name of its own, and a page loaded
    from an address is that address's own origin. Any other name must be in `allowed`
    (exactly, or under a `*.suffix` entry); `*` allows every name."""
    if "*" in allowed:
        return True
    if not host:
        return False
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    for entry in (a.lower().rstrip(".") for a in allowed):
        if name == entry or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


def _json_type(value: str | None) -> bool:
    media = (value or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class _Requests:
    """Host, then (inside CORS) content type and a complete body, before the routes."""

    def __init__(
        self, app: ASGIApp, settings: HttpTransport, max_body_bytes: int, on_refused: Refused
    ) -> None:
        self.app = app
        self.settings = settings
        self.max_body_bytes = max_body_bytes
        self.on_refused = on_refused
        self.routes: set[str] = set()

    async def host(self, scope: Scope, receive: Receive, send: Send, inner: ASGIApp) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if not host_allowed(host, self.settings.allowed_hosts):
                status, body = _error(
                    400,
                    f"Host {host!r} is not allowed: add it to --http-allowed-hosts",
                    "host",
                    "host_not_allowed",
                )
                await self._answer(scope, send, status, body, f"Host {host!r} not allowed")
                return
        await inner(scope, receive, send)

    async def body(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        kind = _header(scope, b"content-type")
        if not _json_type(kind):
            message = f"Content-Type must be application/json, got {kind!r}"
            status, body = _error(415, message, "content-type", "unsupported_media_type")
            await self._answer(scope, send, status, body, message, close=True)
            return
        whole = await self._read(scope, receive, send)
        if whole is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # after the body: a disconnect, when it comes

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body within the deadline and size, or None (answered already)."""
        limit, timeout = self.max_body_bytes, self.settings.body_timeout_s
        size = _header(scope, b"content-length")
        if size is not None and size.isascii() and size.isdigit() and int(size) > limit:
            why = f"body: {size} bytes is over the limit max_message_bytes={limit}"
            status, body = _error(413, why, None, "payload_too_large")
            await self._answer(scope, send, status, body, why, close=True)
            return None
        chunks: list[bytes] = []
        received = 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                message: Message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                why = f"request body not complete within {timeout:g} s ({received} bytes in)"
                status, body = _error(408, why, None, "timeout")
                await self._answer(scope, send, status, body, why, close=True)
                return None
            if message["type"] == "http.disconnect":
                self._log(scope, 499, f"the client left after {received} bytes of the body")
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                why = f"body: over the limit max_message_bytes={limit}"
                status, body = _error(413, why, None, "payload_too_large")
                await self._answer(scope, send, status, body, why, close=True)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _answer(  # noqa: PLR0917
        self, scope: Scope, send: Send, status: int, body: bytes, why: str, close: bool = False
    ) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if close:  # the rest of the request is not read: the connection cannot be reused
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._log(scope, status, why)

    def _log(self, scope: Scope, status: int, why: str) -> None:
        path = scope.get("path", "")
        route = path if path in self.routes else "other"
        peer = _peer(scope.get("client"))
        log.info("http %s %s %d from %s: %s", scope.get("method"), route, status, peer, why)
        self.on_refused(route, status)


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def guard(
    app: ASGIApp,
    settings: HttpTransport,
    *,
    max_body_bytes: int,
    on_refused: Refused,
    routes: tuple[str, ...] = (),
) -> ASGIApp:
    """`app` behind the Host allow-list, CORS (when `settings.cors_origins`), the JSON
    content type and the body deadline. `routes` name the paths metrics may label."""
    requests = _Requests(app, settings, max_body_bytes, on_refused)
    requests.routes = set(routes)
    inner: ASGIApp = requests.body
    if settings.cors_origins:
        inner = CORSMiddleware(
            inner,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=EXPOSED,
            max_age=600,
        )

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        await requests.host(scope, receive, send, inner)

    return guarded
