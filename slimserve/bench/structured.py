"""`slimserve bench structured`: what structured output costs a stream, side by side.

The same engine (in this process, served through its `Frontend` as the engine process
serves it) generates the same prompts with and without a JSON schema, interleaved round by
round so a noisy neighbour slows both alike, at each concurrency. A stream's inter-token
latency (ITL) is the mean gap between its first `WINDOW` tokens; the table gives the median
stream's ITL for each, and the ratio. The schema is a typical one that keeps the output
going (an object with an array of up to 40 enum items and a bounded string), so both
sides generate about as many tokens.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

from slimserve.engine.types import (
    GenerationRequest,
    Guided,
    Message,
    Prompt,
    SamplingParams,
    StopParams,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "risk": {"enum": ["low", "medium", "high"]},
        "signals": {
            "type": "array",
            "items": {"enum": ["amount", "terminal", "country", "hour", "merchant", "velocity"]},
            "minItems": 30,
            "maxItems": 40,
        },
        "note": {"type": "string", "maxLength": 40},
    },
    "required": ["risk", "signals", "note"],
}
#: Tokens of each stream its ITL is measured over.
WINDOW = 48
PROMPTS = [
    "List the signals that make a card payment look risky.",
    "Describe a fraudulent payment pattern in JSON.",
    "Which facts about this payment are unusual?",
    "Summarise the risk of a late-night online purchase abroad.",
]


def _run(front: Any, n: int, tokens: int, guided: Guided | None) -> tuple[list[float], list[int]]:
    """`n` concurrent streams; each stream's mean gap between its first `WINDOW` tokens
    (ms), and each stream's token count."""
    lock = threading.Lock()
    done = threading.Event()
    times: list[list[float]] = [[] for _ in range(n)]
    left = [n]
    errors: list[str] = []

    def sink(i: int) -> Any:
        def on_event(ev: Any) -> None:
            if ev.token_ids:
                times[i].append(time.perf_counter())
            if ev.error is not None:
                errors.append(str(ev.error))
            if ev.finish is not None or ev.error is not None:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        return on_event

    for i in range(n):
        req = GenerationRequest(
            request_id=f"structured-{i}",
            prompt=Prompt(messages=(Message("user", PROMPTS[i % len(PROMPTS)]),)),
            sampling=SamplingParams(),
            stopping=StopParams(max_new_tokens=tokens, ignore_eos=True),
            guided=guided,
        )
        front.submit(req, sink(i))
    done.wait()
    if errors:
        raise RuntimeError(f"generation failed: {errors[0]}")
    # Over the first WINDOW tokens only: a schema ends its output where the grammar does,
    # and shorter streams (a smaller batch, a shorter cache) would flatter either side.
    spans = [t[:WINDOW] for t in times if len(t) > 1]
    return [(t[-1] - t[0]) * 1e3 / (len(t) - 1) for t in spans], [len(t) for t in times]


def measure(front: Any, concurrency: list[int], tokens: int, rounds: int) -> list[dict[str, Any]]:
    """Median-stream ITL with and without the schema at each concurrency."""
    guided = Guided("json_schema", json.dumps(SCHEMA))
    _run(front, 1, 8, guided)  # compile the grammar and warm both paths
    _run(front, 1, 8, None)
    rows = []
    for n in concurrency:
        free: list[float] = []
        held: list[float] = []
        free_n: list[int] = []
        held_n: list[int] = []
        for _ in range(rounds):
            itl, count = _run(front, n, tokens, None)
            free += itl
            free_n += count
            itl, count = _run(front, n, tokens, guided)
            held += itl
            held_n += count
        f, h = statistics.median(free), statistics.median(held)
        rows.append(
            {
                "concurrency": n,
                "free_itl_ms": f,
                "schema_itl_ms": h,
                "ratio": h / f,
                "free_tokens": statistics.mean(free_n),
                "schema_tokens": statistics.mean(held_n),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| streams | ITL free (ms) | ITL with schema (ms) | ratio | tokens free / schema |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['free_itl_ms']:.2f} | {r['schema_itl_ms']:.2f} | "
            f"{r['ratio']:.3f} | {r['free_tokens']:.0f} / {r['schema_tokens']:.0f} |"
        )
    return "\n".join(lines)
