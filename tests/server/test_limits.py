"""Per-connection limits (`ServerConfig.connections`) through a real server and channel.

The server is built without loading a model: these limits live in the HTTP/2 transport,
and a health Watch is a stream that stays open as long as the connection lets it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slimserve.cli import build_parser, serve_config
from slimserve.clients import Client
from slimserve.server.config import Connections
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread

pytestmark = pytest.mark.timeout(60)


def _start(registry: Path, connections: Connections) -> ServerThread:
    from slimserve.server.app import build_server

    config = dataclasses.replace(tiny_server_config(registry), connections=connections)
    server = ServerThread(config)
    server.thread.start()
    server.server, server.port = server.run(build_server(config, load=False))
    return server


@pytest.fixture()
def channel_to(tiny_registry: Path) -> Iterator[Any]:
    """`open(connections) -> (server, channel)`; both closed after the test."""
    opened: list[tuple[ServerThread, grpc.Channel]] = []

    def open_(connections: Connections) -> tuple[ServerThread, grpc.Channel]:
        server = _start(tiny_registry, connections)
        opened.append((server, grpc.insecure_channel(server.target)))
        return opened[-1]

    yield open_
    for server, channel in opened:
        channel.close()
        server.stop()


def _watch(channel: grpc.Channel, timeout: float) -> Any:
    """A health Watch on `channel`, its first status already read (the stream is open)."""
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    next(watch)
    return watch


def _check(channel: grpc.Channel, timeout: float) -> grpc.StatusCode:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_a_call_beyond_max_concurrent_streams_waits_for_a_free_stream(channel_to: Any) -> None:
    _, channel = channel_to(Connections(max_concurrent_streams=1))
    watch = _watch(channel, timeout=30)
    # The one stream the connection allows is the Watch: a second call cannot start.
    assert _check(channel, timeout=1.0) == grpc.StatusCode.DEADLINE_EXCEEDED
    watch.cancel()
    assert _check(channel, timeout=10.0) == grpc.StatusCode.OK


def test_the_default_lets_calls_run_beside_an_open_stream(channel_to: Any) -> None:
    _, channel = channel_to(Connections())
    watch = _watch(channel, timeout=30)
    assert _check(channel, timeout=5.0) == grpc.StatusCode.OK
    watch.cancel()


def test_max_connection_age_closes_an_open_stream_and_the_client_reconnects(
    channel_to: Any,
) -> None:
    server, channel = channel_to(
        Connections(max_connection_age_s=0.5, max_connection_age_grace_s=0.5)
    )
    watch = _watch(channel, timeout=20)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in watch:
            pass
    elapsed = time.monotonic() - t0
    # Age (0.5 s +-10%) plus grace (0.5 s), then the connection is closed under the stream.
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert elapsed < 5.0
    # The channel connects again for the next call; so does the real client.
    assert _check(channel, timeout=10.0) == grpc.StatusCode.OK
    with Client(server.target, timeout=10, retries=0) as c:
        assert c.health() == "NOT_SERVING"  # nothing loaded, but the server answers


def test_without_an_age_limit_an_open_stream_stays_open(channel_to: Any) -> None:
    _, channel = channel_to(Connections(max_connection_age_grace_s=0.1))
    watch = _watch(channel, timeout=2.0)
    with pytest.raises(grpc.RpcError) as err:
        for _ in watch:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # its own deadline, 2 s


def test_grpc_options_follow_the_config() -> None:
    options = dict(Connections().grpc_options())
    assert options["grpc.max_concurrent_streams"] == 128
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert "grpc.max_connection_age_ms" not in options  # 0 = no limit, gRPC's own default
    aged = dict(Connections(max_connection_age_s=300, max_connection_age_grace_s=5).grpc_options())
    assert aged["grpc.max_connection_age_ms"] == 300_000
    assert aged["grpc.max_connection_age_grace_ms"] == 5_000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_concurrent_streams", 0),
        ("max_connection_age_s", -1.0),
        ("max_connection_age_s", float("nan")),
        ("max_connection_age_grace_s", 3e6),  # beyond a C int of milliseconds
        ("keepalive_time_s", 0.0),
        ("keepalive_timeout_s", float("inf")),
        ("min_client_ping_interval_s", -0.5),
    ],
)
def test_bad_limits_are_refused_by_name(field: str, value: float) -> None:
    bad: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        Connections(**bad)


def test_serve_flags_make_the_connections_config(tiny_registry: Path) -> None:
    serve = ["serve", "--model", "tiny", "--registry", str(tiny_registry)]
    args = build_parser().parse_args(serve)
    assert serve_config(args).connections == Connections()  # flag defaults = config defaults
    args = build_parser().parse_args(
        [
            *serve,
            "--max-concurrent-streams", "4",
            "--max-connection-age", "600",
            "--max-connection-age-grace", "15",
            "--keepalive-time", "30",
            "--keepalive-timeout", "5",
            "--min-client-ping-interval", "1",
        ]
    )  # fmt: skip
    assert serve_config(args).connections == Connections(
        max_concurrent_streams=4,
        max_connection_age_s=600,
        max_connection_age_grace_s=15,
        keepalive_time_s=30,
        keepalive_timeout_s=5,
        min_client_ping_interval_s=1,
    )
