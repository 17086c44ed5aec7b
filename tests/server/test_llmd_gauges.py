"""The llm-d / Gateway API Inference Extension gauges (`vllm:num_requests_waiting`,
`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`): exact per step in the engine for
the torch cache and llama.cpp's pool and split caches, and on a real server's /metrics, read
with prometheus_client's own parser, while 24 streams press a 16-slot engine process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from slimserve.clients import AsyncClient
from slimserve.engine.backends import llamacpp
from slimserve.engine.backends.llama import LlamaBackend
from slimserve.engine.scheduler import Engine, EngineConfig, EngineHooks
from slimserve.engine.types import Occupancy
from slimserve.server.config import Limits
from slimserve.server.metrics import VLLM_KV_USAGE, VLLM_KV_USAGE_OLD, VLLM_RUNNING, VLLM_WAITING
from tests.conftest import tiny_server_config
from tests.engine.test_scheduler import request
from tests.helpers import Collector, ServerThread, tiny_model
from tests.server.test_observability import scrape, value

SLOTS, STREAMS, TOKENS = 16, 24, 100
pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python missing")


# ---- the figure, exact, per cache layout ----------------------------------------------------
def _backend(kind: str, model: Any, tokenizer_dir: Path) -> Any:
    if kind == "torch":
        return LlamaBackend.from_model(model, max_slots=4, max_seq_len=64, pack_weights=False)
    return llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tokenizer_dir / "tokenizer.json",
        max_slots=4, max_seq_len=64, threads=1, weight_type="f32", kv_layout=kind,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kind",
    [
        "torch",
        pytest.param("unified", marks=needs_llamacpp),
        pytest.param("split", marks=needs_llamacpp),
    ],
)
def test_occupancy_counts_the_cells_every_running_sequence_holds(
    kind: str, tokenizer: Any, tmp_path: Path
) -> None:
    tokenizer.save_pretrained(tmp_path)
    backend = _backend(kind, tiny_model(len(tokenizer), seed=2), tmp_path)
    seen: list[Occupancy] = []
    # What the engine process sends with each step's events.
    hooks = EngineHooks(on_flush=lambda: seen.append(engine.occupancy()))
    engine = Engine(backend, tokenizer, EngineConfig(max_queue=8), hooks=hooks)
    engine.start()
    try:
        cells = getattr(backend, "kv_pool_tokens", None) or 4 * 64
        assert engine.occupancy() == Occupancy(free_slots=4, kv_cells=cells)
        prompt, n, steps = "hello world again", 3, 8
        size = len(tokenizer(prompt)["input_ids"])
        sinks = [Collector() for _ in range(n)]
        with engine._cond:  # all three are admitted by the same step
            for i, sink in enumerate(sinks):
                engine.submit(request(tokenizer, prompt, steps, rid=f"r{i}"), sink)
        for sink in sinks:
            assert sink.wait()[-1].finish is not None
    finally:
        engine.shutdown()
    used = [o.kv_cells_used for o in seen if o.running]
    distinct = [u for i, u in enumerate(used) if i == 0 or u != used[i - 1]]
    # Each sequence holds its prompt and every token it has generated: after the prefill's
    # first token, then one more per step, until all three end together.
    assert distinct == [n * (size + k) for k in range(1, steps)]
    assert {o.kv_cells for o in seen} == {cells}
    assert max(o.running for o in seen) == n
    assert seen[-1] == Occupancy(free_slots=4, kv_cells=cells)
    assert 0 < max(o.kv_usage for o in seen) <= 1


# ---- the endpoint, under load ----------------------------------------------------------------
def _press(target: str, errors: list[BaseException]) -> None:
    """24 streams opened together from one event loop (threads would trickle in, and a fast
    engine could finish the first ones before the last arrive)."""

    async def one(c: AsyncClient) -> None:
        async for _ in c.stream("the quick brown fox", max_new_tokens=TOKENS, ignore_eos=True):
            pass

    async def press() -> None:
        async with AsyncClient(target, retries=0, timeout=120) as c:
            streams = [one(c) for _ in range(STREAMS)]
            results = await asyncio.gather(*streams, return_exceptions=True)
        errors.extend(r for r in results if isinstance(r, BaseException))

    asyncio.run(press())


def test_gauges_track_load_return_to_idle_and_never_wait_on_the_engine(
    tiny_registry: Path,
) -> None:
    # The eager backend: its steps are slow enough that every stream has arrived while the
    # first ones still run (one connection delivers 24 calls in ~100 ms).
    base = tiny_server_config(
        tiny_registry, backend="hf", limits=Limits(max_new_tokens=TOKENS, default_max_new_tokens=16)
    )
    model = base.model.replace(max_batch=SLOTS)
    server = ServerThread(dataclasses.replace(base, model=model, metrics_port=0)).start()
    try:
        port = server.server.metrics.port
        tiny = {"model_name": "tiny"}
        idle = scrape(port)
        for gauge in (VLLM_WAITING, VLLM_RUNNING, VLLM_KV_USAGE, VLLM_KV_USAGE_OLD):
            assert (gauge, (("model_name", "tiny"),)) in idle  # present, and at 0
            assert value(idle, gauge, **tiny) == 0

        errors: list[BaseException] = []
        presser = threading.Thread(target=_press, args=(server.target, errors))
        presser.start()
        samples: list[dict[Any, float]] = []
        deadline = time.monotonic() + 120
        while presser.is_alive() and time.monotonic() < deadline:
            samples.append(scrape(port))
        presser.join(60)
        assert not errors, errors

        waiting = [value(s, VLLM_WAITING, **tiny) for s in samples]
        running = [value(s, VLLM_RUNNING, **tiny) for s in samples]
        usage = [value(s, VLLM_KV_USAGE, **tiny) for s in samples]
        print(  # the figures behind the targets (pytest -s shows them)
            f"{len(samples)} scrapes under load: waiting max {max(waiting):.0f}, running max "
            f"{max(running):.0f}, kv_cache_usage_perc {min(u for u in usage if u):.4f}.."
            f"{max(usage):.4f}"
        )
        assert max(waiting) >= 1, f"no waiting request seen in {len(samples)} scrapes"
        assert max(running) == SLOTS, list(zip(running, waiting, strict=True))
        assert all(0.0 <= u <= 1.0 for u in usage)
        assert all(u > 0 for u, r in zip(usage, running, strict=True) if r)
        labels = {"model": "tiny", "version": "1"}
        for s in samples:  # one engine figure behind every name
            assert value(s, VLLM_KV_USAGE_OLD, **tiny) == value(s, VLLM_KV_USAGE, **tiny)
            running_now = value(s, "slimserve_requests_running", **labels)
            assert running_now == value(s, VLLM_RUNNING, **tiny)
            queued_now = value(s, "slimserve_requests_queued", **labels)
            assert queued_now == value(s, VLLM_WAITING, **tiny)

        after = scrape(port)  # the last step's frame carried the engine's idle occupancy
        print(f"idle after: kv_cache_usage_perc {value(after, VLLM_KV_USAGE, **tiny)}")
        for gauge in (VLLM_WAITING, VLLM_RUNNING, VLLM_KV_USAGE):
            assert value(after, gauge, **tiny) == 0
        assert value(after, "slimserve_slots_free", **labels) == SLOTS

        # A stopped engine process cannot hold a scrape: the gauges are what it last said.
        pid = server.server.models.get("tiny").info.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            frozen = scrape(port)
            assert time.monotonic() - t0 < 2.0
            assert value(frozen, VLLM_RUNNING, **tiny) == 0
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        server.stop()
