"""`bench serve --systems ...,mixed`: a running stream's gaps while long prompts and a Score
arrive.

One server of its own (contexts of `max_seq_len(long_tokens)`, gRPC and the OpenAI door)
runs `Bench.mixed_streams` greedy streams over gRPC; once each has streamed `WARM_TOKENS`
tokens, three prompts of `Bench.mixed_long_tokens` (1,300) tokens or a few more arrive at
once on the OpenAI door (two
streamed completions, one an `echo` with `logprobs`, which scores every prompt token), and
`SCORE_AFTER_S` later a `SCORE_LABELS`-label Score over gRPC. The streams keep going until
all of that is answered, then stop. Reported per run: each stream's largest gap between two
tokens and its p99 gap from the long prompts' arrival on (beside its p50 before them), the
long prompts' time to their first streamed chunk, and the Score's latency.

The same scenario then runs on a baseline server that feeds prompts whole between decode
steps (`WHOLE_PROMPTS_ARGS`, what the engine did before chunked prefill), so the two
targets are judged side by side in one run: the largest gap <= `GAP_TARGET_MS`, and each
long prompt's TTFT <= `TTFT_TARGET` times the baseline's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time
from typing import Any

from slimserve.bench.http_load import percentile

#: Context per sequence of the mixed server beyond the long prompts: the streams' room.
STREAM_ROOM = 748
LONG_PROMPTS = 3
SCORE_LABELS = 32
#: The Score's prompt: the first characters of a long prompt (~90 SmolLM2 tokens).
SCORE_PROMPT_CHARS = 400
#: Tokens each stream has streamed before the long prompts arrive.
WARM_TOKENS = 16
SCORE_AFTER_S = 0.2
#: Tokens a long prompt generates (the echo's too).
LONG_NEW_TOKENS = 16
#: `serve` flags of the baseline server: a step budget so large that prompts, echoes and
#: Scores are fed whole between two decode steps (the engine before chunked prefill).
WHOLE_PROMPTS_ARGS = ("--max-step-ms", "1000000")
#: Targets: a running stream's largest gap, and the long prompts' TTFT against the
#: baseline's.
GAP_TARGET_MS = 300.0
TTFT_TARGET = 1.3

_SENTENCES = (
    "The harbour master logged every ship that entered the bay before noon.",
    "A new bridge across the river shortened the walk to the market by an hour.",
    "Rainfall in the northern hills was twice the average for the season.",
    "The library extended its opening hours to ten in the evening on weekdays.",
    "Engineers replaced the old pumps at the water works with quieter ones.",
    "The committee approved the budget for the school's new science rooms.",
    "Farmers reported an early harvest of apples and a late one of pears.",
    "The museum lent three paintings to a gallery in the capital for the summer.",
)


def max_seq_len(long_tokens: int) -> int:
    """The mixed server's context per sequence: 2048 for the default 1,300-token prompts."""
    return long_tokens + STREAM_ROOM


def long_text(which: int, sentences: int) -> str:
    """A document of `sentences` numbered notes, distinct from its first words on (a
    prefix cache would find nothing to share between the three), and a question."""
    notes = " ".join(
        f"Note {which}.{i}: {_SENTENCES[(i * (which + 3)) % len(_SENTENCES)]}"
        for i in range(sentences)
    )
    return f"Report {'ABC'[which % 3]}{which}. {notes}\nQuestion: which note mentions a bridge?"


async def _long_prompts(client: Any, tokens: int) -> list[tuple[str, int]]:
    """`LONG_PROMPTS` texts of at least `tokens` tokens (counted by the server's own
    tokenizer; a few more at most) and their token counts."""
    out = []
    for which in range(LONG_PROMPTS):
        per = len(await client.tokenize(long_text(which, 8))) / 8  # tokens a note, about
        n = max(1, int(tokens / per) - 2)
        while len(await client.tokenize(long_text(which, n))) > tokens and n > 1:
            n -= 1
        while (count := len(await client.tokenize(text := long_text(which, n)))) < tokens:
            n += 1
        out.append((text, count))
    return out


async def run(server: Any, b: Any) -> dict[str, Any]:
    """One run of the scenario against `server` (`serve._Server` with its OpenAI door)."""
    from openai import AsyncOpenAI

    from slimserve.bench.serve import PROMPTS

    client = server.client()
    http = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.http_port}/v1",
        api_key="bench",
        max_retries=0,
        timeout=600.0,
    )
    longs = await _long_prompts(client, b.mixed_long_tokens)
    stop = asyncio.Event()
    times: list[list[float]] = [[] for _ in range(b.mixed_streams)]

    async def stream(i: int) -> None:
        budget = max_seq_len(b.mixed_long_tokens) - 64  # the prompt is a short question
        async for chunk in client.stream(PROMPTS[i], max_new_tokens=budget, ignore_eos=True):
            times[i].extend([time.perf_counter()] * max(1, len(chunk.token_ids)))
            if stop.is_set():
                return

    tasks = [asyncio.create_task(stream(i)) for i in range(b.mixed_streams)]
    try:
        while min(map(len, times)) < WARM_TOKENS:
            if any(t.done() for t in tasks):
                await asyncio.gather(*tasks)  # an error: raised here
                raise RuntimeError("a stream ended before the long prompts arrived")
            await asyncio.sleep(0.01)
        arrive = time.perf_counter()
        long_jobs = [
            _long(http, server.model, text, echo=k == LONG_PROMPTS - 1, t0=arrive)
            for k, (text, _) in enumerate(longs)
        ]
        score_job = _score(client, longs[0][0][:SCORE_PROMPT_CHARS])
        answers = await asyncio.gather(*long_jobs, score_job)
        end = time.perf_counter()
        await asyncio.sleep(0.3)  # the streams' pace after the burst, inside the window
    finally:
        stop.set()
        await http.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    score_ms = answers[-1]
    return {
        "streams": [_gaps(ts, arrive, end) for ts in times],
        "long": [
            {"tokens": count, "echo": k == LONG_PROMPTS - 1, "ttft_ms": ttft}
            for k, ((_, count), ttft) in enumerate(zip(longs, answers[:-1], strict=True))
        ],
        "score_labels": SCORE_LABELS,
        "score_ms": score_ms,
    }


async def _long(http: Any, model: str, text: str, *, echo: bool, t0: float) -> float:
    """Milliseconds from `t0` to the long prompt's first streamed chunk."""
    extra: dict[str, Any] = {"echo": True, "logprobs": 1} if echo else {}
    first = None
    stream = await http.completions.create(
        model=model,
        prompt=text,
        max_tokens=LONG_NEW_TOKENS,
        temperature=0,
        stream=True,
        **extra,
    )
    async for _chunk in stream:
        if first is None:
            first = time.perf_counter()
    return ((first or time.perf_counter()) - t0) * 1e3


async def _score(client: Any, prompt: str) -> float:
    """Milliseconds of a `SCORE_LABELS`-label Score arriving `SCORE_AFTER_S` in."""
    await asyncio.sleep(SCORE_AFTER_S)
    labels = [f" answer number {i}" for i in range(SCORE_LABELS)]
    t0 = time.perf_counter()
    await client.score(prompt, labels)
    return (time.perf_counter() - t0) * 1e3


def _gaps(times: list[float], arrive: float, end: float) -> dict[str, float]:
    """A stream's gaps, ms: before the burst (p50), and from its arrival to its end."""
    before = [(b - a) * 1e3 for a, b in itertools.pairwise(times) if b < arrive]
    during = [(b - a) * 1e3 for a, b in itertools.pairwise(times) if b >= arrive and a <= end]
    # A gap that spans the arrival counts as during: it is the stream waiting for the burst.
    return {
        "tokens": float(len(times)),
        "p50_before_ms": percentile(before, 50),
        "max_gap_ms": max(during, default=float("nan")),
        "p99_gap_ms": percentile(during, 99),
    }


def report_lines(mixed: dict[str, Any]) -> list[str]:
    """What `bench serve` prints for the scenario: one line per run, then the worst; with
    the baseline (prompts fed whole) beside it, its runs and the two targets."""
    if "error" in mixed:
        return [f"mixed: error: {mixed['error']}"]
    lines = [f"mixed load (served by {mixed['served']}):", *_run_lines(mixed["runs"])]
    worst = _worst_gap(mixed["runs"])
    lines.append(f"  largest inter-token gap of a running stream: {worst:.0f} ms")
    whole = mixed.get("whole")
    if whole is None:
        return lines
    flags = " ".join(WHOLE_PROMPTS_ARGS)
    if "error" in whole:
        return [*lines, f"mixed baseline (serve {flags}): error: {whole['error']}"]
    lines += [f"mixed baseline, prompts fed whole (serve {flags}):", *_run_lines(whole["runs"])]
    base = _worst_gap(whole["runs"])
    ok = "PASS" if worst <= GAP_TARGET_MS else "MISS"
    lines.append(
        f"largest inter-token gap: {worst:.0f} ms (baseline {base:.0f} ms) "
        f"(target <= {GAP_TARGET_MS:g} ms) {ok}"
    )
    ratios = []
    for k, x in enumerate(mixed["runs"][0]["long"]):
        now = statistics.median(run["long"][k]["ttft_ms"] for run in mixed["runs"])
        was = statistics.median(run["long"][k]["ttft_ms"] for run in whole["runs"])
        ratios.append((now / was, now, was, x["echo"]))
    each = ", ".join(
        f"{r:.2f}x ({now:.0f} vs {was:.0f} ms{', echo' if echo else ''})"
        for r, now, was, echo in ratios
    )
    top = max(r for r, *_ in ratios)
    ok = "PASS" if top <= TTFT_TARGET else "MISS"
    lines.append(
        f"long prompts' TTFT against the baseline: {each}; worst {top:.2f}x "
        f"(target <= {TTFT_TARGET:g}x) {ok}"
    )
    return lines


def _run_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for i, run in enumerate(runs):
        gaps = ", ".join(
            f"max {s['max_gap_ms']:.0f} / p99 {s['p99_gap_ms']:.0f} ms (p50 before "
            f"{s['p50_before_ms']:.1f})"
            for s in run["streams"]
        )
        longs = ", ".join(
            f"{x['ttft_ms']:.0f} ms ({x['tokens']} tokens{', echo+logprobs' if x['echo'] else ''})"
            for x in run["long"]
        )
        lines.append(
            f"  run {i}: stream gaps {gaps}; long prompts' TTFT {longs}; "
            f"{run['score_labels']}-label Score {run['score_ms']:.0f} ms"
        )
    return lines


def _worst_gap(runs: list[dict[str, Any]]) -> float:
    return max((s["max_gap_ms"] for run in runs for s in run["streams"]), default=0.0)
