"""Who may read /metrics: loopback only unless asked, and a bearer token when one is set
(they name the models served and their load)."""

from __future__ import annotations

import dataclasses
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import tiny_server_config
from tests.helpers import ServerThread

TOKEN = "metrics-0123456789abcdef"


def _scrape(port: int, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_listen_on_loopback_even_when_the_api_does_not(tiny_registry: Path) -> None:
    config = dataclasses.replace(tiny_server_config(tiny_registry), host="0.0.0.0", metrics_port=0)
    server = ServerThread(config).start()
    try:
        metrics = server.server.metrics
        assert metrics._http.server_address[0] == "127.0.0.1"
        status, text = _scrape(metrics.port)
        assert status == 200 and "slimserve_slots_free" in text
    finally:
        server.stop()


def test_a_metrics_token_is_required_when_set(tiny_registry: Path) -> None:
    config = dataclasses.replace(
        tiny_server_config(tiny_registry), metrics_port=0, metrics_token=TOKEN
    )
    server = ServerThread(config).start()
    try:
        port = server.server.metrics.port
        for wrong in (None, "nope", TOKEN[:-1], TOKEN + "x"):
            status, text = _scrape(port, wrong)
            assert status == 401 and "slimserve_" not in text, wrong
        status, text = _scrape(port, TOKEN)
        assert status == 200 and "slimserve_requests_running" in text
    finally:
        server.stop()
