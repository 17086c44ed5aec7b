"""A bearer token never leaves this host in clear text unless the caller says so.

The refusal happens while the client is constructed, before any channel exists, so the
remote addresses below (documentation ranges and names) are never contacted.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from slimserve.clients import (
    AsyncClient,
    BaseClient,
    Client,
    ClientError,
    InsecureToken,
    Unauthenticated,
)
from slimserve.clients._base import check_token_channel
from slimserve.clients._target import is_loopback
from slimserve.server.config import AuthConfig
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread

REMOTE: tuple[str | Sequence[str], ...] = (
    "192.0.2.10:50051",
    "scorer.example.com:443",
    "dns:///scorer.example.com:443",
    "dns://127.0.0.1/scorer.example.com:443",  # a local DNS server, a remote peer
    "[2001:db8::1]:50051",
    "127.0.0.1:50051,192.0.2.10:50051",  # one remote replica is enough to refuse
    ["127.0.0.1:50051", "192.0.2.10:50051"],
    "localhost.example.com:50051",
)
LOCAL: tuple[str | Sequence[str], ...] = (
    "127.0.0.1:50051",
    "127.8.9.10:50051",
    "localhost:50051",
    "LOCALHOST:50051",
    "[::1]:50051",
    "::1",
    "dns:///localhost:50051",
    "dns:localhost:50051",
    "ipv4:127.0.0.1:1,127.0.0.2:2",
    "unix:/tmp/slimserve.sock",
    ["127.0.0.1:1", "localhost:2"],
)


@pytest.mark.parametrize("target", REMOTE, ids=str)
@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_a_token_over_plain_text_to_another_host_is_refused(
    cls: type[BaseClient], target: str | Sequence[str]
) -> None:
    with pytest.raises(InsecureToken) as caught:
        cls(target, token="secret-token")

    message = str(caught.value)
    assert "tls_credentials" in message and "allow_insecure_token=True" in message
    assert "secret-token" not in message
    assert isinstance(caught.value, ClientError)


@pytest.mark.parametrize("target", REMOTE, ids=str)
def test_tls_or_the_flag_or_no_token_lets_a_remote_client_be_built(
    target: str | Sequence[str],
) -> None:
    # The check the clients run before opening a channel; here no channel is opened at all.
    tls = grpc.ssl_channel_credentials()
    check_token_channel(target, token="t", credentials=None, allow_insecure_token=True)
    check_token_channel(target, token="t", credentials=tls, allow_insecure_token=False)
    check_token_channel(target, token=None, credentials=None, allow_insecure_token=False)


@pytest.mark.parametrize("target", LOCAL, ids=str)
def test_loopback_targets_are_this_host(target: str | Sequence[str]) -> None:
    assert is_loopback(target)


@pytest.mark.parametrize("target", [*REMOTE, "", "no-port-here", "ipv4:"], ids=str)
def test_remote_or_unreadable_targets_are_not(target: str | Sequence[str]) -> None:
    assert not is_loopback(target)


TOKEN = "loopback-token-0123456789abcdef"


@pytest.fixture(scope="module")
def auth_server(tiny_registry: Path) -> Iterator[ServerThread]:
    """A loopback server that serves only callers with the token `TOKEN`."""
    auth = AuthConfig(tokens=frozenset({TOKEN}))
    config = dataclasses.replace(tiny_server_config(tiny_registry), auth=auth)
    server = ServerThread(config).start()
    yield server
    server.stop()


def test_a_token_to_a_loopback_server_is_sent(auth_server: ServerThread) -> None:
    # The server refuses a caller without the token: a client that dropped it would fail.
    with Client(auth_server.target, retries=0, timeout=30) as c, pytest.raises(Unauthenticated):
        c.model_info()
    with Client(auth_server.target, token=TOKEN, retries=0, timeout=30) as c:
        assert c.model_info().name == "tiny"

    async def check() -> str:
        async with AsyncClient(auth_server.target, token=TOKEN, retries=0, timeout=30) as c:
            return (await c.model_info()).name

    assert asyncio.run(check()) == "tiny"
