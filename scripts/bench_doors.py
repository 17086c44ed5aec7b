"""The HTTP door's overhead against gRPC: the same greedy streamed requests through both
doors of one running server, interleaved, at each concurrency.

    .venv/bin/python scripts/bench_doors.py --grpc 127.0.0.1:50051 \\
        --http http://127.0.0.1:8000 --model smollm2-135m-instruct --concurrency 1,16

Requests alternate doors one by one (2k through gRPC, 2k+1 through HTTP, with the same
prompt), taken by the workers in turn, so both doors see the same load and prompts.
Prints one JSON object per concurrency with TTFT, inter-token gap and end-to-end
percentiles (ms) per door.
Talks only to the addresses it is given; meant for loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import openai

from slimserve.clients import AsyncClient

PROMPTS = (
    "Write one sentence about the sea.",
    "Name three prime numbers and say why they are prime.",
    "Explain what a hash table is to a new programmer.",
    "Give a short tip for writing clear commit messages.",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    grpc: str
    http: str
    model: str
    token: str | None
    concurrency: tuple[int, ...]
    requests: int
    max_tokens: int


@dataclass(slots=True)
class Samples:
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    tokens: int = 0

    def add(self, t0: float, arrivals: list[float]) -> None:
        self.ttft.append(arrivals[0] - t0)
        self.gaps += [b - a for a, b in itertools.pairwise(arrivals)]
        self.e2e.append(arrivals[-1] - t0)
        self.tokens += len(arrivals)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"requests": len(self.e2e)}
        for name, values in (("ttft", self.ttft), ("itl", self.gaps), ("e2e", self.e2e)):
            q = statistics.quantiles(values, n=100) if len(values) > 1 else values * 99
            out[f"{name}_p50_ms"] = round(q[49] * 1e3, 2)
            out[f"{name}_p90_ms"] = round(q[89] * 1e3, 2)
            out[f"{name}_mean_ms"] = round(statistics.fmean(values) * 1e3, 2)
        return out


async def via_grpc(client: AsyncClient, cfg: BenchConfig, prompt: str) -> list[float]:
    arrivals = []
    stream = client.stream(prompt, model=cfg.model, max_new_tokens=cfg.max_tokens, ignore_eos=True)
    async for chunk in stream:
        if chunk.text:
            arrivals.append(time.perf_counter())
    return arrivals


async def via_http(client: openai.AsyncOpenAI, cfg: BenchConfig, prompt: str) -> list[float]:
    arrivals = []
    stream = await client.completions.create(
        model=cfg.model,
        prompt=prompt,
        max_tokens=cfg.max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
    return arrivals


async def run_level(
    cfg: BenchConfig, grpc: AsyncClient, http: openai.AsyncOpenAI, concurrency: int
) -> dict[str, object]:
    doors: dict[str, Callable[[str], Awaitable[list[float]]]] = {
        "grpc": lambda p: via_grpc(grpc, cfg, p),
        "http": lambda p: via_http(http, cfg, p),
    }
    samples = {name: Samples() for name in doors}
    order = list(doors)
    counter = iter(range(cfg.requests))

    async def worker() -> None:
        for i in counter:  # requests 2k and 2k+1: the same prompt, one through each door
            name = order[i % 2]
            t0 = time.perf_counter()
            arrivals = await doors[name](PROMPTS[(i // 2) % len(PROMPTS)])
            if arrivals:
                samples[name].add(t0, arrivals)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(sum(s.tokens for s in samples.values()) / seconds, 1),
        **{name: s.summary() for name, s in samples.items()},
    }


async def main(cfg: BenchConfig) -> None:
    async with AsyncClient(cfg.grpc, token=cfg.token, retries=0, timeout=300) as grpc:
        http = openai.AsyncOpenAI(
            base_url=f"{cfg.http}/v1", api_key=cfg.token or "none", max_retries=0, timeout=300
        )
        try:
            await via_grpc(grpc, cfg, PROMPTS[0])  # warm both doors and the engine
            await via_http(http, cfg, PROMPTS[0])
            for c in cfg.concurrency:
                print(json.dumps(await run_level(cfg, grpc, http, c)), flush=True)
        finally:
            await http.close()


def parse_args() -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grpc", required=True, help="host:port of the gRPC door")
    p.add_argument("--http", required=True, help="http://host:port of the HTTP door")
    p.add_argument("--model", required=True)
    p.add_argument("--token", help="bearer token, when the server wants one")
    p.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    p.add_argument("--requests", type=int, default=64, help="requests per level (both doors)")
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args()
    return BenchConfig(
        grpc=a.grpc,
        http=a.http.rstrip("/"),
        model=a.model,
        token=a.token,
        concurrency=tuple(int(c) for c in a.concurrency.split(",")),
        requests=a.requests,
        max_tokens=a.max_tokens,
    )


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
