"""Hostile and careless clients against a running server, measured from outside: how many
half-sent HTTP requests it still holds over time, and its file descriptors and memory;
or its descriptors across engine restarts. For a before/after, run it against a server
of each build, one at a time.

    slimserve serve --model smollm2-135m-instruct --http-port 8000 &
    python scripts/probe_hostile.py slow-http --http 127.0.0.1:8000 --pid $! --n 200 --wait 75
    python scripts/probe_hostile.py restarts --grpc 127.0.0.1:50051 --pid $! --n 20

`slow-http` opens `--n` connections, half of them stopping in the middle of the request
headers and half after a tenth of a JSON body, then samples every second how many the
server still holds (its established connections on the port) with its descriptors and
RSS, while one normal request checks it still answers. `restarts` kills the model's engine
process (SIGKILL, a stream in flight) `--n` times and reports the server's descriptors.
Prints one JSON object. Talks only to the addresses it is given; meant for loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import time
from typing import Any

import psutil

BODY = json.dumps({"model": "", "prompt": "hello", "max_tokens": 2}).encode()


def _held(server: psutil.Process, port: int) -> int:
    return sum(
        1
        for c in server.net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def _answers(host: str, port: int) -> float | None:
    """Seconds a GET /health/live took, or None when it got no answer within 10 s."""
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(f"GET /health/live HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            return time.monotonic() - t0 if s.recv(64).startswith(b"HTTP/1.1 200") else None
    except OSError:
        return None


def slow_http(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port_text = args.http.rpartition(":")
    port = int(port_text)
    server = psutil.Process(args.pid)
    before = {"fds": server.num_fds(), "rss_mb": server.memory_info().rss / 2**20}
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
    socks = []
    for i in range(args.n):
        s = socket.create_connection((host, port), timeout=10)
        if i % 2:
            s.sendall(head.encode() + b"Content-Type: app")
        else:
            s.sendall(
                f"{head}Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
                .encode() + BODY[: len(BODY) // 10]
            )  # fmt: skip
        socks.append(s)
    t0 = time.monotonic()
    samples = []
    answered = _answers(host, port)
    while True:
        elapsed = time.monotonic() - t0
        held = _held(server, port)
        samples.append(
            {
                "s": round(elapsed, 1),
                "held": held,
                "fds": server.num_fds(),
                "rss_mb": round(server.memory_info().rss / 2**20, 1),
            }
        )
        if held == 0 or elapsed > args.wait:
            break
        time.sleep(1.0)
    for s in socks:
        s.close()
    time.sleep(3.0)
    after = {"fds": server.num_fds(), "rss_mb": server.memory_info().rss / 2**20}
    return {
        "probe": "slow-http",
        "n": args.n,
        "before": before,
        "samples": samples[:: max(1, len(samples) // 20)] + samples[-1:],
        "all_dropped_after_s": samples[-1]["s"] if samples[-1]["held"] == 0 else None,
        "health_answered_in_s": answered,
        "after_clients_closed": after,
        "load_average": os.getloadavg(),
    }


def restarts(args: argparse.Namespace) -> dict[str, Any]:
    from slimserve.clients import Client, ClientError

    server = psutil.Process(args.pid)
    fds = []
    with Client(args.grpc, retries=0, timeout=120) as c:
        plan_before = c.model_info(args.model).plan

        def stream() -> None:
            try:
                for _ in c.stream("Tell me a long story.", max_new_tokens=2000, ignore_eos=True):
                    pass
            except ClientError:
                pass

        for i in range(args.n + 1):
            pid = c.model_info(args.model).engine_pid
            reader = threading.Thread(target=stream)
            reader.start()
            time.sleep(0.5)  # the stream is running
            os.kill(pid, signal.SIGKILL)
            reader.join(60)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if (
                        c.health(args.model) == "SERVING"
                        and c.model_info(args.model).engine_pid != pid
                    ):
                        break
                except ClientError:
                    pass
                time.sleep(0.2)
            if i == 0:
                fds.append(server.num_fds())  # after a first restart: threads and pools exist
        fds.append(server.num_fds())
        info = c.model_info(args.model)
    return {
        "probe": "restarts",
        "n": args.n,
        "plan_before": plan_before,
        "plan_after": info.plan,
        "refused_after": {k: v for k, v in info.refused.items() if "crash" in v},
        "fds_after_first_restart": fds[0],
        "fds_after_all": fds[-1],
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("slow-http")
    p.add_argument("--http", required=True, help="HOST:PORT of the HTTP door")
    p.add_argument("--pid", type=int, required=True, help="the server's process id")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--wait", type=float, default=75.0, help="seconds to watch at most")
    p.set_defaults(run=slow_http)
    p = sub.add_parser("restarts")
    p.add_argument("--grpc", required=True, help="HOST:PORT of the gRPC door")
    p.add_argument("--pid", type=int, required=True, help="the server's process id")
    p.add_argument("--model", default="", help="the model whose engine is killed")
    p.add_argument("--n", type=int, default=20)
    p.set_defaults(run=restarts)
    args = parser.parse_args()
    print(json.dumps(args.run(args), indent=1))


if __name__ == "__main__":
    main()
