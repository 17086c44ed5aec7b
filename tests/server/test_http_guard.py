"""The HTTP door against hostile and careless clients, over real sockets: a DNS-rebinding
page, a cross-site form, slow and half-sent requests, too many connections, clients that
leave mid-body. Each is refused with the right status, the server keeps serving, and its
file descriptors and memory come back to where they were."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest

from slimserve.server.config import HttpTransport
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread

BODY = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2}).encode()


def _server(registry: Path, transport: HttpTransport) -> ServerThread:
    config = dataclasses.replace(tiny_server_config(registry), http_port=0, http=transport)
    return ServerThread(config).start()


@pytest.fixture(scope="module")
def door(tiny_registry: Path) -> Iterator[ServerThread]:
    """Default Host and CORS rules; short deadlines, so slow clients are dropped in seconds."""
    transport = HttpTransport(header_timeout_s=1.0, body_timeout_s=2.0, max_connections=320)
    server = _server(tiny_registry, transport)
    yield server
    server.stop()


def _port(server: ServerThread) -> int:
    return int(server.server.http.port)


def _request(
    port: int,
    *,
    host: str | None = None,
    content_type: str | None = "application/json",
    method: str = "POST",
    path: str = "/v1/completions",
    body: bytes = BODY,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a raw socket: (status, headers, body), as any client would send it."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    got = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return int(status_line.split()[1]), got, rest


def _error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


def test_a_dns_rebinding_host_is_refused_and_real_names_pass(door: ServerThread) -> None:
    port = _port(door)
    status, _, body = _request(port, host=f"attacker.example:{port}")
    assert status == 400 and _error_code(body) == "host_not_allowed"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
        status, _, body = _request(port, host=host)
        assert status == 200, (host, body)


def test_a_cross_site_form_post_is_415_and_json_passes(door: ServerThread) -> None:
    port = _port(door)
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        status, _, body = _request(port, content_type=kind)
        assert status == 415 and _error_code(body) == "unsupported_media_type", kind
    status, _, _ = _request(port, content_type="application/json; charset=utf-8")
    assert status == 200


def test_cors_is_off_unless_configured(door: ServerThread, tiny_registry: Path) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    port = _port(door)
    status, headers, _ = _request(port, method="OPTIONS", body=b"", headers=preflight)
    assert status >= 400 and "access-control-allow-origin" not in headers
    _, headers, _ = _request(port, headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in headers
    configured = _server(
        tiny_registry,
        HttpTransport(allowed_hosts=("api.example",), cors_origins=("https://app.example",)),
    )
    try:
        port = _port(configured)
        status, headers, _ = _request(port, method="OPTIONS", body=b"", headers=preflight)
        assert status == 200
        assert headers["access-control-allow-origin"] == "https://app.example"
        other = {**preflight, "Origin": "https://evil.example"}
        _, headers, _ = _request(port, method="OPTIONS", body=b"", headers=other)
        assert "access-control-allow-origin" not in headers
        status, headers, _ = _request(
            port, host="api.example", headers={"Origin": "https://app.example"}
        )
        assert status == 200 and "x-request-id" in headers["access-control-expose-headers"]
        status, _, _ = _request(port, host="other.example")
        assert status == 400
    finally:
        configured.stop()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _drained(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server sent before it closed the connection; None if it never closed."""
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        if not chunk:
            return data
        data += chunk
    return None


def test_200_half_sent_requests_are_dropped_and_descriptors_come_back(
    door: ServerThread,
) -> None:
    """Before: 200 half-sent requests were all held after 75 s (descriptors 21 -> 221)."""
    port = _port(door)
    me = psutil.Process()
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    oai.completions.create(model="tiny", prompt="warm", max_tokens=2)
    fds, rss = _fds(), me.memory_info().rss
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    slow: list[tuple[str, socket.socket]] = []
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:  # headers never finished
            s.sendall(head.encode() + b"Content-Type: app")
            slow.append(("headers", s))
        else:  # headers done, a tenth of the body
            s.sendall(
                f"{head}Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
                .encode() + BODY[: len(BODY) // 10]
            )  # fmt: skip
            slow.append(("body", s))
    t0 = time.monotonic()
    # The attack holds no slot: the server answers meanwhile.
    reply = oai.completions.create(model="tiny", prompt="hello", max_tokens=2)
    assert reply.choices[0].text is not None
    deadline = t0 + 10.0  # the deadlines are 1 s (headers) and 2 s (body)
    answers = {kind: [] for kind in ("headers", "body")}  # type: dict[str, list[bytes | None]]
    for kind, s in slow:
        answers[kind].append(_drained(s, deadline))
    dropped_in = time.monotonic() - t0
    for kind, got in answers.items():
        assert all(a is not None for a in got), f"{kind}: {sum(a is None for a in got)} held"
        assert all(a is not None and a.startswith(b"HTTP/1.1 408") for a in got), kind
    for _, s in slow:
        s.close()
    deadline = time.monotonic() + 10
    while _fds() > fds + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fds() <= fds + 2, (fds, _fds())
    grown = me.memory_info().rss - rss
    assert grown < 300 * 2**20, f"memory grew by {grown / 2**20:.0f} MB"
    assert dropped_in < 10
    assert oai.completions.create(model="tiny", prompt="again", max_tokens=2).choices
    oai.close()


def test_a_kept_alive_connection_must_send_its_next_request_in_time(door: ServerThread) -> None:
    """Each byte reset uvicorn's keep-alive timer: a client trickling the next request's
    headers held the connection for good. Now the headers have their own deadline."""
    port = _port(door)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += s.recv(65536)
        t0 = time.monotonic()
        got = b""
        for byte in b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1234567890":
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            s.settimeout(0.25)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            got += chunk
            if not chunk or b"\r\n\r\n" in got:
                break
        held = time.monotonic() - t0
    assert got.startswith(b"HTTP/1.1 408"), got
    assert held < 4, f"held {held:.1f} s with a 1 s header deadline"


def test_too_many_connections_get_503_and_huge_headers_431(door: ServerThread) -> None:
    port = _port(door)
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(320)]
    try:
        time.sleep(0.2)
        status, headers, body = _request(port)
        assert status == 503 and headers["retry-after"] == "1"
        assert _error_code(body) == "too_many_connections"
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    status, _, body = _request(port, headers={"X-Filler": "a" * 70_000})
    assert status == 431 and _error_code(body) == "headers_too_large"
    assert _request(port)[0] == 200
    # A large body in the same reads as its headers is a body, not headers.
    big = json.dumps({"model": "tiny", "prompt": "hello " * 200_000, "max_tokens": 2})
    status, _, body = _request(port, body=big.encode())
    assert status == 400 and "bytes" in json.loads(body)["error"]["message"], body[:200]


def test_a_client_leaving_mid_body_is_one_log_line(
    door: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    port = _port(door)
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"mod'.encode()
        )
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while not any("499" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the disconnect was never logged"
        time.sleep(0.05)
    left = [r for r in caplog.records if "499" in r.getMessage()]
    assert len(left) == 1 and "left after 5 bytes" in left[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_the_door_sends_without_delay_on_kept_alive_connections(door: ServerThread) -> None:
    """A listening socket from `socket.create_server` has protocol number 0, so asyncio
    never set TCP_NODELAY on the connections it accepted: on a kept-alive connection each
    response body waited ~40 ms behind its headers for the client's delayed ACK. Every
    accepted connection now has it. Mutation: the door's listening socket made by
    `socket.create_server` again fails this."""
    port = _port(door)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        got = b""
        while not got.endswith(b'{"status":"ok"}'):
            got += s.recv(65536)
        (local,) = [s.getsockname()]
        conns = door.server.http.server.server_state.connections
        socks = [c.transport.get_extra_info("socket") for c in conns]
        ours = [x for x in socks if x is not None and x.getpeername() == local]
        assert len(ours) == 1, socks
        assert ours[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
