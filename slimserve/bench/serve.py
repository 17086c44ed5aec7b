"""`slimserve bench serve`: streaming latency and throughput, side by side in one run.

Every system runs in its own process on the same weights and thread count: slimserve as a
real server driven over gRPC by an asyncio load generator, and the baselines through
`slimserve.bench.worker`. Runs are interleaved (repeat → concurrency → system), so a noisy
neighbour slows every system alike; figures are medians over repeats, percentiles over all
requests. The load average before each run is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works, step by step.",
    "List ten facts about the planet Mars.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main causes of inflation?",
    "Give me a recipe for a simple tomato soup.",
    "Summarise the plot of a detective novel you invent.",
    "Explain the difference between TCP and UDP.",
    "Write a poem about autumn leaves.",
    "How do vaccines train the immune system?",
    "Describe a day in the life of a software engineer.",
    "What should I pack for a week of hiking?",
    "Explain recursion with an example in Python.",
    "Why do cats purr? Give several theories.",
    "Write a product description for a reusable water bottle.",
    "How does a bill become a law?",
]


@dataclass
class Sample:
    system: str
    concurrency: int
    repeat: int
    ttft_ms: list[float]
    itl_ms: list[float]
    e2e_ms: list[float]
    tokens: int
    wall_s: float
    peak_rss_mb: float
    load_before: float
    error: str = ""


@dataclass
class Bench:
    registry: Path
    model: str
    threads: int
    new_tokens: int
    concurrency: list[int]
    repeats: int
    systems: list[str]
    gguf: Path | None
    max_batch: int
    gguf_q8: Path | None = None
    #: slimserve's serving backend (`serve --backend`), for slimserve and engine alike.
    backend: str = "auto"
    #: llama.cpp backend weight format (`serve --gguf-type`).
    gguf_type: str = "auto"
    #: The version hf_generate runs (default: `model`), e.g. the fp32 parent of an int8 model.
    hf_model: str | None = None
    samples: list[Sample] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vm_hwm_mb(pid: int) -> float:
    """Peak RSS of `pid` and every process under it (the server's engine processes and
    their forkserver), as the sum of each one's peak: an upper bound of the peak total."""
    import psutil

    total = 0.0
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        try:
            lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        except OSError:
            continue  # ended meanwhile
        total += sum(int(ln.split()[1]) / 1024 for ln in lines if ln.startswith("VmHWM:"))
    return total


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class _Worker:
    def __init__(self, system: str, b: Bench) -> None:
        cmd = [
            sys.executable, "-m", "slimserve.bench.worker", system,
            "--registry", str(b.registry),
            "--model", (b.hf_model or b.model) if system == "hf_generate" else b.model,
            "--threads", str(b.threads), "--max-batch", str(b.max_batch),
            "--backend", b.backend, "--gguf-type", b.gguf_type,
        ]  # fmt: skip
        gguf = b.gguf_q8 if system == "llama_cpp_q8" else b.gguf
        if gguf is not None:
            cmd += ["--gguf", str(gguf)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        out: dict[str, Any] = json.loads(line)
        return out

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(30)


class _Server:
    def __init__(self, b: Bench) -> None:
        self.port = _free_port()
        cmd = [
            sys.executable, "-m", "slimserve.cli", "serve", "--model", b.model,
            "--registry", str(b.registry), "--port", str(self.port),
            "--threads", str(b.threads), "--max-batch", str(b.max_batch),
            "--max-seq-len", "1024", "--device", "cpu", "--backend", b.backend,
            "--gguf-type", b.gguf_type,
        ]  # fmt: skip
        self.log = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        from slimserve.clients import Client

        with Client(self.target, retries=0) as c:
            c.wait_ready(600)
            info = c.model_info()
        #: What served the figures: "<name>@<version> on <backend>".
        self.served = f"{info.name}@{info.version} on {info.backend}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        from slimserve.clients import AsyncClient

        async with AsyncClient(self.target, timeout=600, retries=0) as client:

            async def one(prompt: str, t0: float) -> dict[str, Any]:
                times = []
                async for chunk in client.stream(
                    prompt, max_new_tokens=new_tokens, ignore_eos=True, token_ids=True
                ):
                    if chunk.token_ids:
                        times.append(time.perf_counter())
                itl = [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
                return {
                    "ttft_ms": (times[0] - t0) * 1e3,
                    "itl_ms": itl,
                    "e2e_ms": (times[-1] - t0) * 1e3,
                    "tokens": len(times),
                }

            t0 = time.perf_counter()
            runs = await asyncio.gather(*(one(p, t0) for p in prompts))
            wall = time.perf_counter() - t0
        return {"runs": list(runs), "wall_s": wall, "peak_rss_mb": _vm_hwm_mb(self.proc.pid)}

    async def score_latency(self, n: int, concurrency: int) -> dict[str, float]:
        from slimserve.clients import AsyncClient

        prompt = "Transaction: 912.40 EUR, online, country BR, 03:12. Is this fraud? Answer:"
        async with AsyncClient(self.target, timeout=120, retries=0) as client:
            lat: list[float] = []

            async def one() -> None:
                r = await client.score(prompt, [" yes", " no"])
                lat.append(r.latency_ms)

            t0 = time.perf_counter()
            for _ in range(n // concurrency):
                await asyncio.gather(*(one() for _ in range(concurrency)))
            wall = time.perf_counter() - t0
        return {
            "concurrency": concurrency,
            "p50_ms": _pct(lat, 50),
            "p99_ms": _pct(lat, 99),
            "per_s": len(lat) / wall,
        }

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    vs = sorted(values)
    k = (len(vs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(vs) - 1)
    return vs[lo] + (vs[hi] - vs[lo]) * (k - lo)


def summarise(b: Bench) -> list[dict[str, Any]]:
    rows = []
    for system in b.systems:
        for c in b.concurrency:
            ss = [s for s in b.samples if s.system == system and s.concurrency == c]
            ok = [s for s in ss if not s.error]
            if not ok:
                if ss:
                    rows.append({"system": system, "concurrency": c, "error": ss[0].error})
                continue
            ttft = [x for s in ok for x in s.ttft_ms]
            itl = [x for s in ok for x in s.itl_ms]
            rows.append(
                {
                    "system": system,
                    "model": b.model,
                    "concurrency": c,
                    "threads": b.threads,
                    "new_tokens": b.new_tokens,
                    "repeats": len(ok),
                    "ttft_ms_p50": _pct(ttft, 50),
                    "ttft_ms_p99": _pct(ttft, 99),
                    "itl_ms_p50": _pct(itl, 50),
                    "itl_ms_p99": _pct(itl, 99),
                    "e2e_ms_p50": _pct([x for s in ok for x in s.e2e_ms], 50),
                    "tokens_per_s": statistics.median(s.tokens / s.wall_s for s in ok),
                    "decode_tokens_per_s": 1e3 / statistics.mean(itl) if itl else float("nan"),
                    "peak_rss_mb": max(s.peak_rss_mb for s in ok),
                    "load_before": statistics.median(s.load_before for s in ok),
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]], baseline: str = "hf_generate") -> str:
    base = {r["concurrency"]: r for r in rows if r["system"] == baseline and "error" not in r}
    lines = [
        "| system | conc | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
        f"tok/s | decode tok/s | vs {baseline} | peak RSS MB | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['concurrency']} | {r['error']} |")
            continue
        ref = base.get(r["concurrency"]) or base.get(1)
        ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['ttft_ms_p50']:.1f} | "
            f"{r['ttft_ms_p99']:.1f} | {r['itl_ms_p50']:.1f} | {r['itl_ms_p99']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {ratio:.2f}× | "
            f"{r['peak_rss_mb']:.0f} | {r['load_before']:.2f} |"
        )
    return "\n".join(lines)


def ipc_overhead(rows: list[dict[str, Any]]) -> list[str]:
    """The engine in its own process against in-process, per concurrency (same plan)."""
    by = {(r["system"], r["concurrency"]): r for r in rows if "error" not in r}
    lines = []
    for (system, c), ipc in sorted(by.items()):
        local = by.get(("engine", c))
        if system != "engine_ipc" or local is None:
            continue
        cost = ipc["itl_ms_p50"] / local["itl_ms_p50"] - 1
        lines.append(
            f"engine over IPC vs in-process, concurrency {c}: tok/s "
            f"{ipc['tokens_per_s'] / local['tokens_per_s']:.3f}x, ITL p50 "
            f"{ipc['itl_ms_p50']:.2f} vs {local['itl_ms_p50']:.2f} ms "
            f"({cost:+.1%} per token; target <= +5%)"
        )
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    systems = sorted({r["system"] for r in ok})
    concs = sorted({r["concurrency"] for r in ok})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(systems), 1)
    for i, s in enumerate(systems):
        vals = [
            next((r["tokens_per_s"] for r in ok if r["system"] == s and r["concurrency"] == c), 0)
            for c in concs
        ]
        ax.bar([j + i * width for j in range(len(concs))], vals, width, label=s)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(concs))])
    ax.set_xticklabels([f"concurrency {c}" for c in concs])
    ax.set_ylabel("generated tokens/s (aggregate)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(b: Bench) -> dict[str, Any]:
    import torch

    from slimserve.engine.machine import cpu_info, llamacpp_build

    cpu = cpu_info()
    build = llamacpp_build() or {}
    return {
        "command": shlex.join(sys.argv),
        "cpu": cpu.model,
        "cpu_isa": " ".join(cpu.isa),
        "amx": cpu.has_amx,
        "llamacpp_build": f"{build.get('compiler', 'unrecorded')} native={build.get('native')}",
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": b.threads,
        "model": b.model,
        "hf_generate_model": b.hf_model or b.model,
        "new_tokens": b.new_tokens,
        "repeats": b.repeats,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def run(b: Bench, *, score: bool = True) -> dict[str, Any]:
    server = _Server(b) if "slimserve" in b.systems else None
    workers: dict[str, _Worker] = {}
    try:
        for s in b.systems:
            if s != "slimserve":
                workers[s] = _Worker(s, b)
        for rep in range(b.repeats):
            for c in b.concurrency:
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(c)]
                for system in b.systems:
                    load = _loadavg()
                    if system == "slimserve":
                        assert server is not None
                        out = asyncio.run(server.run(prompts, b.new_tokens))
                    else:
                        out = workers[system].run(prompts, b.new_tokens)
                    if "error" in out:
                        b.samples.append(
                            Sample(system, c, rep, [], [], [], 0, 0, 0, load, out["error"])
                        )
                        continue
                    runs = out["runs"]
                    b.samples.append(
                        Sample(
                            system=system,
                            concurrency=c,
                            repeat=rep,
                            ttft_ms=[r["ttft_ms"] for r in runs],
                            itl_ms=[x for r in runs for x in r["itl_ms"]],
                            e2e_ms=[r["e2e_ms"] for r in runs],
                            tokens=sum(r["tokens"] for r in runs),
                            wall_s=out["wall_s"],
                            peak_rss_mb=out["peak_rss_mb"],
                            load_before=load,
                        )
                    )
                    print(
                        f"  rep {rep} c={c:<2} {system:12} "
                        f"{b.samples[-1].tokens / out['wall_s']:.1f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
        scores = []
        if server is not None and score:
            scores = [asyncio.run(server.score_latency(32, c)) for c in (1, 16)]
    finally:
        if server is not None:
            server.close()
        for w in workers.values():
            w.close()
    env = environment(b)
    if server is not None:
        env["slimserve_backend"] = server.served
    return {"environment": env, "results": summarise(b), "score": scores}
