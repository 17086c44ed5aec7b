"""An operator's mistakes at the command line: one clear line and exit code 2, never a
traceback. A port already held (by any process, or by another slimserve server, which
SO_REUSEPORT used to let share it) and registry refs that are not refs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import tiny_server_config
from tests.helpers import ServerThread


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slimserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _one_error_line(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    ours = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert len(ours) == 1, out.stderr
    for word in words:
        assert word in ours[0], ours[0]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process (here: a plain socket) listens on."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_serve_on_a_port_in_use_is_one_line_and_exit_2(
    flag: str, held_port: int, tiny_registry: Path
) -> None:
    args = ["serve", "--model", "tiny", "--registry", str(tiny_registry), "--port", "0"]
    if flag != "--port":
        args.append(flag)
    else:
        args.pop()
    out = _cli(*args, str(held_port))
    what = {"--port": "gRPC", "--http-port": "HTTP", "--metrics-port": "metrics"}[flag]
    _one_error_line(out, what, str(held_port), "in use")


def test_a_second_server_cannot_take_the_first_ones_grpc_port(tiny_registry: Path) -> None:
    """gRPC sets SO_REUSEPORT by default: a second server bound the same port and took half
    of the first one's connections."""
    first = ServerThread(tiny_server_config(tiny_registry)).start()
    try:
        out = _cli("serve", "--model", "tiny", "--registry", str(tiny_registry),
                   "--port", str(first.port))  # fmt: skip
        _one_error_line(out, "gRPC", str(first.port), "in use")
    finally:
        first.stop()


def test_registry_show_bad_refs_are_one_line(tiny_registry: Path, tmp_path: Path) -> None:
    reg = ["--registry", str(tiny_registry)]
    for ref in ("tiny@²", "tiny@٣", "tiny@1x", "tiny@-1", "²", "tiny@latest@2", "tiny@7"):
        _one_error_line(_cli("registry", "show", ref, *reg), ref.split("@")[-1])
    assert json.loads(_cli("registry", "show", "tiny@1", *reg).stdout)["version"] == 1
    # A broken aliases file is the registry's problem, named as such: still one line.
    broken = tmp_path / "reg"
    (broken / "tiny" / "1").mkdir(parents=True)
    (broken / "tiny" / "aliases.json").write_text("{not json")
    _one_error_line(_cli("registry", "show", "tiny@prod", "--registry", str(broken)), "aliases")
