"""Scale-out on Ray, measured on this machine (needs `pip install slimserve[ray]`):

    .venv/bin/python scripts/bench_scale.py --registry R --model smollm2-135m-instruct@1 \\
        ingress --concurrency 1,16 --requests 64
    .venv/bin/python scripts/bench_scale.py --registry R --model smollm2-135m-instruct@1 \\
        batch --rows 2000 --workers 1,2

`ingress`: the Ray Serve application (one replica) against `slimserve serve --http-port`,
the same model, engine threads and greedy streamed completions through the openai SDK,
requests alternating between the two one by one so both see the same load; prints TTFT and
end-to-end percentiles and tokens/s per system at each concurrency, and their ratios.

`batch`: a simulated file of payments scored by `slimserve fraud score`'s code through one
`slimserve serve`, then over Ray with each number of workers; prints rows/s and whether
every score equals the single-machine one. Starts a local Ray cluster with the machine's
CPUs; prints the CPU and the load average with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

PROMPTS = (
    "Write one sentence about the sea.",
    "Name three prime numbers and say why they are prime.",
    "Explain what a hash table is to a new programmer.",
    "Give a short tip for writing clear commit messages.",
)


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return platform.processor()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    """`slimserve serve` in a process of its own; returns it and its gRPC port, once SERVING."""
    from slimserve.clients import Client, ClientError

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimserve.cli", "serve", "--model", args.model,
         "--registry", str(args.registry), "--port", str(port), "--threads", str(args.threads),
         "--max-batch", "16", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    with Client(f"127.0.0.1:{port}", retries=0, timeout=5) as c:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, "slimserve serve exited"
            try:
                if c.health() == "SERVING":
                    return proc, port
            except ClientError:
                pass
            time.sleep(0.5)
    raise TimeoutError("server not SERVING")


def server_config(args: argparse.Namespace) -> Any:
    from slimserve.engine.config import ModelConfig
    from slimserve.server.config import ServerConfig

    return ServerConfig(
        registry=args.registry.resolve(),
        models=(args.model,),
        port=0,
        threads=args.threads,
        model=ModelConfig.of(device="cpu", max_batch=16),
    )


# ---- ingress ---------------------------------------------------------------------------------
async def stream(client: openai.AsyncOpenAI, model: str, prompt: str, tokens: int) -> list[float]:
    arrivals = []
    parts = await client.completions.create(
        model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for part in parts:
        if part.choices and part.choices[0].text:
            arrivals.append(time.perf_counter())
    return arrivals


def summary(ttft: list[float], e2e: list[float], tokens: int, seconds: float) -> dict[str, float]:
    def q(values: list[float], p: int) -> float:
        return round(statistics.quantiles(values, n=100)[p - 1] * 1e3, 1)

    return {
        "ttft_p50_ms": q(ttft, 50), "ttft_p90_ms": q(ttft, 90),
        "e2e_p50_ms": q(e2e, 50), "e2e_p90_ms": q(e2e, 90),
        "tokens_per_s": round(tokens / seconds, 1),
    }  # fmt: skip


async def ingress_level(
    doors: dict[str, openai.AsyncOpenAI], model: str, c: int, requests: int, tokens: int
) -> dict[str, Any]:
    names = list(doors)
    got: dict[str, tuple[list[float], list[float], list[int]]] = {n: ([], [], []) for n in names}
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:  # 2k and 2k+1: the same prompt, one through each system
            name = names[i % 2]
            t0 = time.perf_counter()
            arrivals = await stream(doors[name], model, PROMPTS[(i // 2) % len(PROMPTS)], tokens)
            ttft, e2e, count = got[name]
            ttft.append(arrivals[0] - t0)
            e2e.append(arrivals[-1] - t0)
            count.append(len(arrivals))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    seconds = time.perf_counter() - t0  # both systems ran through the same seconds
    out: dict[str, Any] = {"concurrency": c, "cpu": cpu(), "load": load()}
    for name, (ttft, e2e, count) in got.items():
        out[name] = summary(ttft, e2e, sum(count), seconds)
    ray_, own = out["ray_serve"], out["slimserve_http"]
    out["ratio_ray_over_own"] = {k: round(ray_[k] / own[k], 3) for k in own}
    return out


def ingress(args: argparse.Namespace) -> None:
    import ray

    from slimserve.scale.serve_app import Scaling, run

    http = free_port()
    proc, _ = start_server(args, "--http-port", str(http))
    try:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        serve_port = free_port()
        run(server_config(args), Scaling(replicas=1, max_ongoing=32, cpus=1), http_port=serve_port)
        doors = {
            "ray_serve": openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="x", max_retries=0
            ),
            "slimserve_http": openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{http}/v1", api_key="x", max_retries=0
            ),
        }
        model = args.model.partition("@")[0]

        async def main() -> None:
            for door in doors.values():  # warm both
                await stream(door, model, PROMPTS[0], args.max_tokens)
            for c in args.concurrency:
                level = await ingress_level(doors, model, c, args.requests, args.max_tokens)
                print(json.dumps(level), flush=True)

        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(60)
        ray.shutdown()


# ---- batch -----------------------------------------------------------------------------------
def batch(args: argparse.Namespace) -> None:
    import ray

    from slimserve.clients import Client
    from slimserve.fraud.scorer import ScoreOptions, score_file
    from slimserve.fraud.simulate import write_simulation
    from slimserve.scale.batch import RayScorer

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    write_simulation(tmp / "all.csv", max(200, args.rows // 12), 30, 11)
    lines = (tmp / "all.csv").read_text().splitlines(keepends=True)
    path = tmp / "payments.csv"
    path.write_text("".join(lines[: args.rows + 1]))
    options = ScoreOptions(model=args.model, concurrency=args.concurrency)

    def scores(text: str) -> list[str]:
        return [line.split(",")[1] for line in text.splitlines()[1:]]

    proc, port = start_server(args)
    try:
        out = io.StringIO()
        with Client(f"127.0.0.1:{port}", timeout=600) as client:
            alone = score_file(path, client, options, out=out, log=io.StringIO())
        reference = scores(out.getvalue())
        print(json.dumps({
            "system": f"slimserve serve ({args.threads} threads)", "rows": len(alone.scored),
            "rows_per_s": round(len(alone.scored) / alone.scoring_s, 1),
            "cpu": cpu(), "load": load(),
        }), flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(60)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        for n in args.workers:
            out = io.StringIO()
            with RayScorer(server_config(args), n, cpus=(os.cpu_count() or 1) / n) as scorer:
                spread = score_file(path, None, options, out=out, log=io.StringIO(), scorer=scorer)
            got = scores(out.getvalue())
            same = sum(a == b for a, b in zip(got, reference, strict=True))
            print(json.dumps({
                "system": f"Ray, {n} workers ({args.threads} threads each)",
                "rows": len(spread.scored),
                "rows_per_s": round(len(spread.scored) / spread.scoring_s, 1),
                "scores_equal_to_single_machine": f"{same}/{len(reference)}",
                "cpu": cpu(), "load": load(),
            }), flush=True)  # fmt: skip
    finally:
        ray.shutdown()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--model", required=True, help="NAME@REF")
    p.add_argument("--threads", type=int, default=1, help="engine threads of every system")
    sub = p.add_subparsers(dest="what", required=True)
    i = sub.add_parser("ingress")
    i.add_argument("--concurrency", default="1,16")
    i.add_argument("--requests", type=int, default=64, help="per level, both systems")
    i.add_argument("--max-tokens", type=int, default=32)
    b = sub.add_parser("batch")
    b.add_argument("--rows", type=int, default=2000)
    b.add_argument("--workers", default="1,2")
    b.add_argument("--concurrency", type=int, default=1, help="Score calls in flight per engine")
    args = p.parse_args()
    if args.what == "ingress":
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    else:
        args.workers = [int(w) for w in args.workers.split(",")]
    return args


if __name__ == "__main__":
    a = parse_args()
    if a.what == "ingress":
        ingress(a)
    else:
        batch(a)
