"""`slimserve bench ipc`: what the engine process's wire costs per step.

One decode step of N streams crosses the pipe as one `ipc.Events` frame: the engine process
encodes it, the server decodes it. This times both halves (and a request's, once per
request) with msgspec's encoders on the typed frames, as the engine and the server run
them, on events shaped like a real step's: one token each, with and without log-probabilities
(5 alternatives), and a step where every stream finishes. Pure CPU work, no model.
"""

from __future__ import annotations

import time
from typing import Any

from slimserve.engine import ipc
from slimserve.engine.types import (
    Event,
    Finish,
    GenerationRequest,
    Prompt,
    SamplingParams,
    StopParams,
    StopReason,
    Timings,
    TokenLogprob,
)

SHAPES = ("tokens", "logprobs", "finish")


def step_events(streams: int, shape: str) -> ipc.Events:
    """One step's events for `streams` streams, of the given shape."""
    items = []
    for rid in range(streams):
        lps: tuple[TokenLogprob, ...] = ()
        if shape == "logprobs":
            top = tuple((i, -1.0 - i) for i in range(5))
            lps = (TokenLogprob(123, -0.5, top, " word", tuple(f" t{i}" for i in range(5))),)
        fin = None
        if shape == "finish":
            times = Timings(queue_ms=1.0, prefill_ms=2.0, ttft_ms=3.0, decode_ms=4.0, total_ms=5.0)
            fin = Finish(
                reason=StopReason.MAX_TOKENS,
                stop_sequence="",
                input_tokens=30,
                generated_tokens=64,
                timings=times,
            )
        items.append((rid, Event(text=" word", token_ids=(1234,), logprobs=lps, finish=fin)))
    return ipc.Events(items=items)


def _time(fn: Any, repeats: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e6


def measure(streams: tuple[int, ...] = (1, 16), repeats: int = 2000) -> list[dict[str, Any]]:
    """Microseconds to encode and decode one step's frame, per shape and stream count, and a
    request's (a 300-token prompt)."""
    engine, server = ipc.engine_codec(), ipc.server_codec()
    rows = []
    req = GenerationRequest(
        request_id="r" * 32,
        prompt=Prompt(ids=tuple(range(300))),
        sampling=SamplingParams(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, seed=1),
        stopping=StopParams(max_new_tokens=128, stop_sequences=("\n\n",)),
    )
    submit = ipc.Submit(rid=1, request=req)
    data = server.encode(submit)
    rows.append(
        {
            "what": "request (300-token prompt)",
            "streams": 1,
            "encode_us": _time(lambda: server.encode(submit), repeats),
            "decode_us": _time(lambda: engine.decode(data), repeats),
            "bytes": len(data),
        }
    )
    for n in streams:
        for shape in SHAPES:
            frame = step_events(n, shape)
            data = engine.encode(frame)
            rows.append(
                {
                    "what": f"step: {shape}",
                    "streams": n,
                    "encode_us": _time(lambda f=frame: engine.encode(f), repeats),
                    "decode_us": _time(lambda d=data: server.decode(d), repeats),
                    "bytes": len(data),
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| what | streams | encode µs | decode µs | total µs | bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        total = r["encode_us"] + r["decode_us"]
        lines.append(
            f"| {r['what']} | {r['streams']} | {r['encode_us']:.1f} | {r['decode_us']:.1f} | "
            f"{total:.1f} | {r['bytes']} |"
        )
    return "\n".join(lines)
