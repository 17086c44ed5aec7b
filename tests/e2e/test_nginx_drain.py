"""Two `slimserve serve` replicas behind a real nginx, configured by deploy/nginx/slimserve.conf
itself (grpc_pass for gRPC, proxy_pass for the OpenAI HTTP door): one replica gets SIGTERM
mid-load; its in-flight streams finish, new requests go to the other, and no request fails.

Skipped only where nginx is not installed (scripts/setup installs Debian's package)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from slimserve.clients import Client
from tests.e2e.test_serve_processes import free_port, metric, spawn, stop, wait_serving

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup)"),
    pytest.mark.slow,  # nginx and two replicas
]
CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "slimserve.conf"
TINY = {"model": "tiny", "version": "1"}
LONG = 64  # tokens of a long stream: seconds on the eager backend


def _nginx_conf(tmp: Path, grpc: list[int], http: list[int], listen: tuple[int, int]) -> Path:
    """The deploy file with this machine's ports, inside a minimal main config."""
    text = CONF.read_text()
    upstream_ports = iter([*grpc, *http])
    text = re.sub(
        r"server 127\.0\.0\.1:\d+", lambda _: f"server 127.0.0.1:{next(upstream_ports)}", text
    )
    text = text.replace("listen 50050 http2;", f"listen 127.0.0.1:{listen[0]} http2;")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen[1]};")
    (tmp / "slimserve.conf").write_text(text)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "".join(f"  {kind}_temp_path {tmp / kind};\n" for kind in kinds)
    main = tmp / "nginx.conf"
    main.write_text(
        f"worker_processes 1;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'} warn;\n"
        "daemon off;\nevents {\n  worker_connections 256;\n}\n"
        f"http {{\n  access_log {tmp / 'access.log'};\n{temp}"
        f"  include {tmp / 'slimserve.conf'};\n}}\n"
    )
    return main


def _loop(stop_at: threading.Event, call: Callable[[], Any], log: list[Any]) -> None:
    while not stop_at.is_set():
        try:
            log.append((time.monotonic(), call()))
        except Exception as exc:
            log.append((time.monotonic(), exc))


def test_sigterm_one_replica_behind_nginx_drains_and_loses_nothing(
    tiny_registry: Path, tmp_path: Path
) -> None:
    grpc, http, metrics = ([free_port(), free_port()] for _ in range(3))
    front = (free_port(), free_port())
    replicas = [
        spawn(tiny_registry, grpc[i], tmp_path / f"replica{i}.log", "--backend", "hf",
              "--http-port", str(http[i]), "--metrics-port", str(metrics[i]),
              "--max-batch", "8", "--max-new-tokens-limit", str(LONG), "--grace", "30")
        for i in range(2)
    ]  # fmt: skip
    nginx: subprocess.Popen[bytes] | None = None
    try:
        for i, proc in enumerate(replicas):
            wait_serving(proc, grpc[i], tmp_path / f"replica{i}.log")
        conf = _nginx_conf(tmp_path, grpc, http, front)
        nginx = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)])  # type: ignore[list-item]
        grpc_front, http_front = f"127.0.0.1:{front[0]}", f"http://127.0.0.1:{front[1]}/v1"
        deadline = time.monotonic() + 30
        while True:  # nginx is up once it proxies a call
            try:
                with Client(grpc_front, retries=0, timeout=5) as c:
                    c.generate("hi", max_new_tokens=1)
                break
            except Exception:
                assert time.monotonic() < deadline, (tmp_path / "error.log").read_text()
                time.sleep(0.2)

        # Long streams through both doors, spread over both replicas by nginx.
        streams: dict[str, Any] = {}
        first = threading.Barrier(7)

        def grpc_stream(key: str) -> None:
            with Client(grpc_front, timeout=120) as c:
                chunks = []
                for chunk in c.stream("the quick brown", max_new_tokens=LONG, ignore_eos=True):
                    if not chunks:
                        first.wait(60)
                    chunks.append(chunk)
                streams[key] = chunks[-1]

        def http_stream(key: str) -> None:
            client = OpenAI(base_url=http_front, api_key="none", max_retries=0, timeout=120)
            parts = client.completions.create(
                model="tiny", prompt="the quick brown", max_tokens=LONG, temperature=0,
                stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            reasons = []
            for n, part in enumerate(parts):
                if n == 0:
                    first.wait(60)
                reasons.append(part.choices[0].finish_reason)
            streams[key] = reasons[-1]

        long = [threading.Thread(target=grpc_stream, args=(f"grpc{i}",)) for i in range(3)]
        long += [threading.Thread(target=http_stream, args=(f"http{i}",)) for i in range(3)]
        for t in long:
            t.start()
        first.wait(60)  # every stream has its first token: all six are in flight
        assert metric(metrics[0], "slimserve_requests_running", **TINY) >= 1
        assert metric(metrics[1], "slimserve_requests_running", **TINY) >= 1

        # Short requests keep coming through both doors while replica 0 drains and leaves.
        done = threading.Event()
        grpc_log: list[Any] = []
        http_log: list[Any] = []
        grpc_client = Client(grpc_front, timeout=60)  # retries UNAVAILABLE, as clients do
        http_client = OpenAI(base_url=http_front, api_key="none", max_retries=0, timeout=60)
        load = [
            threading.Thread(
                target=_loop,
                args=(done, lambda: grpc_client.generate("hello", max_new_tokens=4).text, grpc_log),
            ),
            threading.Thread(
                target=_loop,
                args=(
                    done,
                    lambda: (
                        http_client.completions.create(model="tiny", prompt="hello", max_tokens=4)
                        .choices[0]
                        .text
                    ),
                    http_log,
                ),
            ),
        ]
        for t in load:
            t.start()
        time.sleep(0.5)
        t_term = time.monotonic()
        replicas[0].send_signal(signal.SIGTERM)
        assert replicas[0].wait(40) == 0, (tmp_path / "replica0.log").read_text()[-3000:]
        t_gone = time.monotonic()
        time.sleep(1.5)  # load on the survivor alone
        done.set()
        for t in (*load, *long):
            t.join(120)
        grpc_client.close()

        assert t_gone - t_term < 30  # drained within --grace
        assert sorted(streams) == ["grpc0", "grpc1", "grpc2", "http0", "http1", "http2"]
        for key, last in streams.items():  # every in-flight stream ran to its end
            if key.startswith("grpc"):
                assert last.stop_reason == "MAX_TOKENS" and last.generated_tokens == LONG
            else:
                assert last == "length"
        for log in (grpc_log, http_log):
            failures = [r for _, r in log if isinstance(r, Exception)]
            assert not failures, failures[:3]
            assert any(t > t_gone for t, _ in log), "nothing served after the replica left"
        assert metric(metrics[1], "slimserve_rpcs_total", method="Generate", code="OK") > 0
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for proc in replicas:
            stop(proc)
