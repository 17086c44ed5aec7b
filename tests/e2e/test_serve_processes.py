"""`slimserve serve` as real processes on loopback: graceful shutdown with a stream in
flight, two replicas behind one round-robin client channel, and a bounded load test.

Every server here binds 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from slimserve.clients import (
    Client,
    ClientError,
    DeadlineExceeded,
    InvalidArgument,
    Unavailable,
)

TOKEN = "replica-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    registry: Path, port: int, log: Path, *flags: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`slimserve --log-format json serve --model tiny ...`, logging to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "slimserve.cli", "--log-format", "json", "serve",
             "--model", "tiny", "--registry", str(registry), "--host", "127.0.0.1",
             "--port", str(port), "--threads", "1", *flags],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def wait_serving(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with Client(f"127.0.0.1:{port}", retries=0, timeout=2) as c:
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
            try:
                if c.health() == "SERVING":
                    return
            except ClientError:
                pass
            assert time.monotonic() < deadline, "server not SERVING in time"
            time.sleep(0.2)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(port: int, name: str, **labels: str) -> float:
    return scrape(port).get((name, tuple(sorted(labels.items()))), 0.0)


def json_lines(log: Path) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


# ---- graceful shutdown ---------------------------------------------------------------------
def test_sigterm_drains_the_in_flight_stream_then_exits_zero(
    tiny_registry: Path, tmp_path: Path
) -> None:
    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "SLIMSERVE_AUTH_TOKEN": TOKEN}
    # The eager backend decodes the tiny model at ~20-30 ms a token: a 110-token stream
    # lasts seconds, long enough to be cut off by a shutdown that does not drain.
    proc = spawn(tiny_registry, port, log, "--backend", "hf", "--max-batch", "2",
                 "--max-seq-len", "128", "--max-new-tokens-limit", "120", "--grace", "30",
                 env=env)  # fmt: skip
    try:
        wait_serving(proc, port, log)
        target = f"127.0.0.1:{port}"
        statuses: list[str] = []
        watch_end: list[str] = []

        def watch() -> None:  # what a client-side health checker would see
            with grpc.insecure_channel(target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    for r in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60):
                        statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
                    watch_end.append("OK")
                except grpc.RpcError as exc:
                    watch_end.append(exc.code().name)

        chunks: list[Any] = []
        first = threading.Event()
        ended: list[float] = []

        def consume() -> None:
            with Client(target, retries=0, timeout=60, token=TOKEN) as c:
                for chunk in c.stream("hello", max_new_tokens=110, ignore_eos=True):
                    chunks.append(chunk)
                    first.set()
            ended.append(time.monotonic())

        watcher = threading.Thread(target=watch)
        watcher.start()
        reader = threading.Thread(target=consume)
        reader.start()
        assert first.wait(30)
        while not statuses:
            time.sleep(0.01)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        refused = False
        with Client(target, retries=0, timeout=5, token=TOKEN) as c:
            while not refused and time.monotonic() < t_term + 10:
                try:
                    c.generate("hello", max_new_tokens=1)
                except Unavailable:
                    refused = True
                time.sleep(0.02)
        refused_while_streaming = refused and not ended
        reader.join(60)
        proc.wait(40)
        t_exit = time.monotonic()
        watcher.join(10)
    finally:
        stop(proc)
    assert refused_while_streaming, "a new call was not refused while the stream drained"
    assert ended and ended[0] > t_term
    assert chunks[-1].stop_reason == "MAX_TOKENS" and chunks[-1].generated_tokens == 110
    assert statuses[0] == "SERVING" and statuses[-1] == "NOT_SERVING"
    assert watch_end == ["OK"], "the health watch should end cleanly once it said NOT_SERVING"
    assert proc.returncode == 0
    # Not the whole 30 s grace: the health watch ends by itself, so nothing holds the stop.
    assert t_exit - ended[0] < 10
    text = log.read_text()
    assert TOKEN not in text
    lines = json_lines(log)
    assert any(line["message"].startswith("shutting down") for line in lines)
    streams = [line for line in lines if line.get("method") == "GenerateStream"]
    assert streams and streams[0]["code"] == "OK" and streams[0]["generated_tokens"] == 110


# ---- scale-out -----------------------------------------------------------------------------
@pytest.mark.slow
def test_round_robin_over_two_replicas_survives_losing_one(
    tiny_registry: Path, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    ports = [free_port(), free_port()]
    mports = [free_port(), free_port()]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [
        spawn(tiny_registry, p, log, "--metrics-port", str(m), "--auth-token-file", str(tokens))
        for p, m, log in zip(ports, mports, logs, strict=True)
    ]
    try:
        for proc, port, log in zip(procs, ports, logs, strict=True):
            wait_serving(proc, port, log)
        ok = {"method": "Generate", "code": "OK"}
        target = ",".join(f"127.0.0.1:{p}" for p in ports)  # -> ipv4:...; round_robin
        with Client(target, retries=4, timeout=30, token=TOKEN) as c:
            for _ in range(4):
                assert c.health() == "SERVING"  # connects both subchannels
            for i in range(20):
                g = c.generate(f"hello {i}", max_new_tokens=2, request_id=f"rr-{i}")
                assert g.model == "tiny@1" and g.request_id == f"rr-{i}"
            counts = [metric(m, "slimserve_rpcs_total", **ok) for m in mports]
            assert sum(counts) == 20 and min(counts) >= 5, counts  # both replicas served

            procs[0].kill()  # abrupt: no drain, connections reset
            procs[0].wait(30)
            for i in range(20):
                assert c.generate(f"again {i}", max_new_tokens=2).model == "tiny@1"
            chunks = list(c.stream("still there", max_new_tokens=3, ignore_eos=True))
            assert chunks[-1].generated_tokens == 3
            assert metric(mports[1], "slimserve_rpcs_total", **ok) == counts[1] + 20
        # A DNS name (as a headless Service gives) balances the same way.
        with Client(f"dns:///localhost:{ports[1]}", retries=2, timeout=30, token=TOKEN) as c:
            assert c.generate("by name", max_new_tokens=1).model == "tiny@1"
        # The survivor's JSON access log names the request ids the client sent.
        ids = {line.get("request_id") for line in json_lines(logs[1])}
        assert any(f"rr-{i}" in ids for i in range(20))
        assert TOKEN not in logs[0].read_text() + logs[1].read_text()
    finally:
        for proc in procs:
            stop(proc)


def test_dns_target_uses_round_robin() -> None:
    from slimserve.clients.client import channel_target

    for target in ("dns:///slimserve-headless.ns.svc.cluster.local:50051", "a:1,b:2"):
        assert ("grpc.lb_policy_name", "round_robin") in channel_target(target)[1]
    assert ("grpc.lb_policy_name", "round_robin") not in channel_target("a:1")[1]


# ---- load ----------------------------------------------------------------------------------
CLIENTS = 8
DURATION_S = 20.0


def _worker(target: str, seed: int, until: float, out: dict[str, Any]) -> None:
    """One client: a seeded mix of calls until `until`; records outcomes and latencies."""
    rng = random.Random(seed)
    ops: Counter[str] = Counter()
    unexpected: list[str] = []
    latency: list[float] = []
    with Client(target, retries=0, timeout=30) as c:
        while time.monotonic() < until:
            op = rng.choices(
                ["stream", "unary", "score", "cancel", "deadline", "invalid", "tokenize"],
                weights=[25, 20, 20, 10, 10, 10, 5],
            )[0]
            t0 = time.monotonic()
            try:
                if op == "stream":
                    n = rng.randint(1, 48)
                    last = list(c.stream("café naïve", max_new_tokens=n, ignore_eos=True))[-1]
                    assert last.generated_tokens == n
                elif op == "unary":
                    n = rng.randint(1, 32)
                    assert (
                        c.generate("hello", max_new_tokens=n, ignore_eos=True).generated_tokens == n
                    )
                elif op == "score":
                    assert len(c.score("the quick brown", [" fox", " dog", " cat"]).scores) == 3
                elif op == "cancel":
                    stream = c.stream("hello", max_new_tokens=64, ignore_eos=True)
                    next(stream)
                    next(stream)
                    stream.close()  # cancels the RPC mid-stream
                elif op == "deadline":
                    try:
                        c.generate("hello", max_new_tokens=64, ignore_eos=True,
                                   timeout=rng.uniform(0.002, 0.05))  # fmt: skip
                    except DeadlineExceeded:
                        ops["deadline_exceeded"] += 1
                elif op == "invalid":
                    try:
                        c.generate("hello", max_new_tokens=10_000)
                        unexpected.append("invalid request was served")
                    except InvalidArgument:
                        pass
                else:
                    assert c.tokenize("hello world")
                if op in ("unary", "score"):
                    latency.append(time.monotonic() - t0)
                ops[op] += 1
            except Exception as exc:
                unexpected.append(f"{op}: {type(exc).__name__}: {exc}")
    out[f"worker{seed}"] = {"ops": ops, "unexpected": unexpected, "latency": latency}


@pytest.mark.slow
def test_bounded_load_mix(tiny_registry: Path, tmp_path: Path) -> None:
    import psutil

    port, mport, log = free_port(), free_port(), tmp_path / "server.log"
    proc = spawn(tiny_registry, port, log, "--max-batch", "8", "--max-seq-len", "128",
                 "--metrics-port", str(mport))  # fmt: skip
    try:
        wait_serving(proc, port, log)
        server = psutil.Process(proc.pid)
        # The front process and its engine process (which holds the weights and KV cache).
        rss: list[tuple[int, int]] = []
        t_start = time.monotonic()
        until = t_start + DURATION_S
        results: dict[str, Any] = {}
        workers = [
            threading.Thread(target=_worker, args=(f"127.0.0.1:{port}", s, until, results))
            for s in range(CLIENTS)
        ]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            rss.append((server.memory_info().rss, _children_rss(server)))
            time.sleep(0.25)
        for w in workers:
            w.join(60)
        elapsed = time.monotonic() - t_start
        # Engine slots: every one free again once the cancelled/expired ones are reaped.
        tiny = {"model": "tiny", "version": "1"}
        deadline = time.monotonic() + 10
        while metric(mport, "slimserve_slots_free", **tiny) != 8:
            assert time.monotonic() < deadline, "engine slots leaked"
            time.sleep(0.1)
        samples = scrape(mport)
        assert proc.poll() is None
        with Client(f"127.0.0.1:{port}", retries=0) as c:
            assert c.health() == "SERVING"
    finally:
        stop(proc)

    ops: Counter[str] = Counter()
    unexpected: list[str] = []
    latency: list[float] = []
    for r in results.values():
        ops.update(r["ops"])
        unexpected += r["unexpected"]
        latency += r["latency"]
    third = len(rss) // 3
    first, last, peak = {}, {}, {}
    for i, side in enumerate(("front", "engine")):
        first[side] = statistics.median(r[i] for r in rss[:third]) / 2**20
        last[side] = statistics.median(r[i] for r in rss[-third:]) / 2**20
        peak[side] = max(r[i] for r in rss) / 2**20
    q = statistics.quantiles(latency, n=100)
    codes: Counter[str] = Counter()
    for (name, labels), count in samples.items():
        if name == "slimserve_rpcs_total":
            codes[dict(labels)["code"]] += int(count)
    report = {
        "clients": CLIENTS,
        "seconds": round(elapsed, 1),
        "calls": sum(ops.values()) - ops["deadline_exceeded"],
        "ops": dict(ops),
        "calls_per_s": round((sum(ops.values()) - ops["deadline_exceeded"]) / elapsed, 1),
        "unary_score_p50_ms": round(q[49] * 1e3, 1),
        "unary_score_p99_ms": round(q[98] * 1e3, 1),
        "generated_tokens": samples[("slimserve_generated_tokens_total", tuple(tiny.items()))],
        "server_codes": dict(codes),
        **{f"rss_{side}_first_third_mib": round(first[side], 1) for side in first},
        **{f"rss_{side}_last_third_mib": round(last[side], 1) for side in last},
        **{f"rss_{side}_peak_mib": round(peak[side], 1) for side in peak},
        "unexpected": unexpected[:10],
    }  # fmt: skip
    print("load test:", json.dumps(report))
    (tmp_path / "load.json").write_text(json.dumps(report, indent=2))
    assert not unexpected, unexpected[:10]
    assert "UNKNOWN" not in codes, codes  # every call the server saw got a meaningful code
    assert ops["cancel"] > 0 and ops["deadline"] > 0 and ops["score"] > 0
    # Memory: no growth between the first and last third beyond allocator noise, in the
    # front process and in the engine process.
    assert first["engine"] > 0, "the engine process was never sampled"
    for side in ("front", "engine"):
        assert last[side] <= first[side] * 1.10 + 16, (side, report)


def _children_rss(process: Any) -> int:
    """The resident bytes of `process`'s children (its engine process): 0 for one that is
    gone between listing and reading (a restart)."""
    import psutil

    total = 0
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total
