"""The openai SDK as `bench serve`'s client of OpenAI-compatible servers.

slimserve's HTTP door (`slimserve_http`) and llama.cpp's `llama-server` (`llama_server`)
are raced through this one client, on one event loop and one connection pool per system
(what a real client keeps), with each prompt sent as the same token ids (tokenized once by
the artifact's own tokenizer), so both servers see identical inputs.

A streamed completion's token arrivals are its chunks that carry text (both servers send
one per generated token); its token count is the server's own `usage` when it reports one.
Imports the standard library and the openai SDK (when a run starts) only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from slimserve.bench.worker import record

#: The user messages of the one-token chat probe: a new conversation each time.
CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Name a prime number larger than ten.",
    "Which planet is known as the red planet?",
    "What colour do you get by mixing blue and yellow?",
    "How many legs does a spider have?",
    "Who wrote the play Romeo and Juliet?",
)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile `q` (0..100) of `values` (NaN when empty)."""
    if not values:
        return float("nan")
    vs = sorted(values)
    k = (len(vs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(vs) - 1)
    return vs[lo] + (vs[hi] - vs[lo]) * (k - lo)


async def timed_probe(one: Callable[[int], Awaitable[Any]], n: int) -> dict[str, float]:
    """`one(i)` for i < n, one after another: latency percentiles, ms."""
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await one(i)
        lat.append((time.perf_counter() - t0) * 1e3)
    return {"n": n, "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90)}


def chat_question(i: int) -> str:
    """The `i`-th probe message: never the same text twice in a run (no prefix is shared
    beyond the chat template's own header)."""
    return f"Question {i + 1}. {CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)]}"


class OpenAIDriver:
    """Drives one OpenAI-compatible server at `base_url` (".../v1") as model `model`.

    `prompt_ids` maps each benchmark prompt's text to the token ids it is sent as."""

    def __init__(self, base_url: str, model: str, prompt_ids: Mapping[str, list[int]]) -> None:
        self.base_url = base_url
        self.model = model
        self.prompt_ids = dict(prompt_ids)
        self._runner = asyncio.Runner()
        self._client: Any = None

    def _open(self) -> Any:
        if self._client is None:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(
                base_url=self.base_url, api_key="bench", max_retries=0, timeout=600.0
            )
        return self._client

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        """Stream `prompts` at once, greedy, `new_tokens` each (EOS ignored): the raw
        timings `bench serve` summarises."""
        return self._runner.run(self._run(prompts, new_tokens))

    async def _run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        client = self._open()
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(self._one(client, p, new_tokens, t0) for p in prompts))
        return {"runs": list(runs), "wall_s": time.perf_counter() - t0}

    async def _one(self, client: Any, prompt: str, new_tokens: int, t0: float) -> dict[str, Any]:
        times: list[float] = []
        text: list[str] = []
        usage = None
        stream = await client.completions.create(
            model=self.model,
            prompt=self.prompt_ids[prompt],
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
                text.append(chunk.choices[0].text)
            if getattr(chunk, "usage", None) is not None:
                usage = chunk.usage
        out = record(t0, times, None, "".join(text))
        if usage is not None and usage.completion_tokens:
            out["tokens"] = int(usage.completion_tokens)
        return out

    def chat_probe(self, n: int) -> dict[str, float]:
        """`n` one-token chat completions one after another, each a new user message:
        latency percentiles, ms (what a first token costs on a fresh prompt)."""
        return self._runner.run(self._chat_probe(n))

    async def _chat_probe(self, n: int) -> dict[str, float]:
        client = self._open()

        async def one(i: int) -> None:
            await client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": chat_question(i)}],
                max_tokens=1,
                temperature=0,
            )

        return await timed_probe(one, n)

    def close(self) -> None:
        if self._client is not None:
            self._runner.run(self._client.close())
            self._client = None
        self._runner.close()
