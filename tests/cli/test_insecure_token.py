"""The client commands refuse to send a token in plaintext to another host, before any
connection, unless `--allow-insecure-token` says the network is trusted.

192.0.2.1 (TEST-NET-1) is only ever a target the client refuses before it opens a channel;
no test here lets a command connect anywhere but 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimserve.cli import build_parser
from slimserve.server.config import AuthConfig
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread

pytestmark = pytest.mark.timeout(120)

TOKEN = "user-token-0123456789abcdef"
REMOTE = "192.0.2.1:50051"
COMMANDS = [
    ["models"],
    ["health"],
    ["generate", "hello"],
    ["score", "hello", "a", "b"],
]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slimserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture()
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture()
def listener() -> Iterator[socket.socket]:
    """A loopback socket that listens but never answers: it tells whether anyone dialled."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.5)
    yield sock
    sock.close()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_token_to_another_host_without_tls_is_refused_before_connecting(
    command: list[str], token_file: Path, listener: socket.socket
) -> None:
    # One loopback address beside the remote one: the target as a whole is not this host,
    # and the loopback peer shows whether the command opened any connection at all.
    here = f"127.0.0.1:{listener.getsockname()[1]}"
    out = run_cli(*command, "--target", f"{here},{REMOTE}", "--token-file", str(token_file))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"slimserve {command[0]}: error: refusing to send")
    assert "--tls-ca" in lines[0] and "--allow-insecure-token" in lines[0]
    assert TOKEN not in out.stderr and out.stdout == ""
    with pytest.raises(TimeoutError):
        listener.accept()  # nobody dialled


def test_the_remote_address_alone_is_refused_too(token_file: Path) -> None:
    out = run_cli("models", "--target", REMOTE, "--token-file", str(token_file))
    assert out.returncode == 2 and REMOTE in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [*COMMANDS, ["fraud", "score", "rows.csv"]], ids=str)
def test_every_client_command_takes_the_flag(command: list[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(command).allow_insecure_token is False
    assert parser.parse_args([*command, "--allow-insecure-token"]).allow_insecure_token is True


@pytest.fixture(scope="module")
def auth_server(tiny_registry: Path) -> Iterator[ServerThread]:
    config = dataclasses.replace(
        tiny_server_config(tiny_registry), auth=AuthConfig(tokens=frozenset({TOKEN}))
    )
    server = ServerThread(config).start()
    yield server
    server.stop()


def test_with_the_flag_the_token_is_sent_and_accepted(
    auth_server: ServerThread, token_file: Path
) -> None:
    target = ["--target", auth_server.target, "--token-file", str(token_file)]
    out = run_cli("models", *target, "--allow-insecure-token")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("tiny@1 (default)")
    # The token is what let it in: without one the server refuses the call.
    bare = run_cli("models", "--target", auth_server.target)
    assert bare.returncode == 2 and "UNAUTHENTICATED" in bare.stderr.upper(), bare.stderr
