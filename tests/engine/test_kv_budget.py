"""The KV cache is bounded by configuration: the torch backend's context fits the budget,
and llama.cpp's shared pool of cells holds every request the engine admits."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from slimserve.engine.backends import llamacpp
from slimserve.engine.backends.select import build_backend
from slimserve.engine.config import EngineConfig, ModelConfig
from slimserve.engine.loader import context_length
from slimserve.engine.scheduler import Engine, EngineHooks
from slimserve.engine.spec import kv_bytes_per_token
from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams
from tests.helpers import Collector, tiny_model


def test_context_fits_the_budget_when_not_given(tokenizer: Any) -> None:
    model = tiny_model(len(tokenizer), max_position_embeddings=100_000)
    per_token = kv_bytes_per_token(model.config, torch.float32)  # 2 x 2 layers x 2 x 16 x 4
    assert per_token == 2 * 2 * 2 * 16 * 4
    cfg = ModelConfig.of(device="cpu", max_batch=8, kv_cache_mb=1)
    n = context_length(model, cfg.cache, torch.float32)
    assert n == 2**20 // (per_token * 8)
    backend = build_backend(model, cfg, n)
    assert backend.kv_bytes_per_slot() * cfg.cache.max_batch <= 2**20


def test_an_explicit_size_over_budget_is_refused_naming_the_flags(tokenizer: Any) -> None:
    model = tiny_model(len(tokenizer))
    cfg = ModelConfig.of(device="cpu", max_batch=64, max_seq_len=4096, kv_cache_mb=1)
    with pytest.raises(ValueError, match="kv_cache_mb=1; raise --kv-cache-mb"):
        context_length(model, cfg.cache, torch.float32)


def test_a_budget_too_small_for_any_useful_context_is_refused(tokenizer: Any) -> None:
    model = tiny_model(len(tokenizer))
    cfg = ModelConfig.of(device="cpu", max_batch=4096, kv_cache_mb=1)
    with pytest.raises(ValueError, match="tokens per sequence"):
        context_length(model, cfg.cache, torch.float32)


# ---- llama.cpp's shared pool ------------------------------------------------------------
#
# With kv_layout="unified" every llama.cpp sequence draws its cache cells from one pool,
# capped by kv_pool_bytes; the engine admits a request only while the pool can hold all
# it may grow to. These run the real llama.cpp context over a tiny model and read the
# cells llama.cpp itself holds after every phase of every step.

needs_llamacpp = pytest.mark.skipif(
    not llamacpp.available(),
    reason="llama-cpp-python is not installed: the shared KV pool is llama.cpp's own",
)

SEQ_LEN = 64
#: Cells in the capped pool: room for one request of 50 and one of 14, not two of 50.
POOL = 80


def _ids(seed: int, n: int, vocab: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, vocab) for _ in range(n))


def _request(rid: str, prompt: tuple[int, ...], n: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt=Prompt(ids=prompt),
        sampling=SamplingParams(),
        stopping=StopParams(max_new_tokens=n, ignore_eos=True),
    )


@pytest.fixture(scope="module")
def pooled_model(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny model and its tokenizer.json, which a llama.cpp backend is built from."""
    model = tiny_model(len(tokenizer), seed=5)
    out = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(out)
    return model, out / "tokenizer.json"


def _cpp(pooled_model: tuple[Any, Path], pool_cells: int | None) -> Any:
    """llama.cpp over the tiny model in f32: four 64-token slots in one pool of cells,
    `pool_cells` of them (None: a full context per slot)."""
    model, tokenizer_json = pooled_model
    per_token = kv_bytes_per_token(model.config, torch.float32)  # llama.cpp's f32 cache
    return llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tokenizer_json,
        max_slots=4, max_seq_len=SEQ_LEN, threads=1, weight_type="f32", kv_layout="unified",
        kv_pool_bytes=None if pool_cells is None else pool_cells * per_token,
    )  # fmt: skip


def _cells_held(backend: Any) -> int:
    """Cache cells llama.cpp holds for the slots' sequences now (its own memory, not the
    engine's count; every sequence's positions run from pos_min to pos_max)."""
    lc, mem = backend.lc, backend._mem
    held = 0
    for seq in range(backend.max_slots):
        last = lc.llama_memory_seq_pos_max(mem, seq)
        if last >= 0:
            held += last - lc.llama_memory_seq_pos_min(mem, seq) + 1
    return held


@needs_llamacpp
@pytest.mark.parametrize("prefix_cache", [False, True], ids=["plain", "prefix-cache"])
def test_the_llamacpp_pool_admits_first_come_first_served_within_its_cells(
    pooled_model: tuple[Any, Path], tokenizer: Any, prefix_cache: bool
) -> None:
    """A may grow to 50 cells, B to 52, C to 14, in a pool of 80: B waits until A ends,
    and C, which would fit beside A, waits behind B (first come, first served), then runs
    beside B. llama.cpp never holds more than the pool's cells (the finished prompts the
    prefix cache keeps included), and every request makes the tokens it makes alone."""
    vocab = len(tokenizer)
    requests = [
        _request("A", _ids(1, 10, vocab), 40),
        _request("B", _ids(2, 12, vocab), 40),
        _request("C", _ids(3, 4, vocab), 10),
    ]
    alone_backend = _cpp(pooled_model, None)
    alone = Engine(alone_backend, tokenizer, EngineConfig(prefix_cache=False))
    alone.start()
    try:
        expected = {r.request_id: _tokens(alone, r) for r in requests}
    finally:
        alone.shutdown()
        alone_backend.close()

    backend = _cpp(pooled_model, POOL)
    assert backend.kv_pool_tokens == POOL
    held: list[int] = []
    order: list[tuple[str, str]] = []
    made: dict[str, list[int]] = {r.request_id: [] for r in requests}
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def sink(rid: str) -> Any:
        def on_event(ev: Any) -> None:
            with lock:
                if ev.token_ids and not made[rid]:
                    order.append((rid, "first"))
                made[rid] += ev.token_ids
                if ev.finish is not None or ev.error is not None:
                    order.append((rid, "end" if ev.error is None else f"error {ev.error!r}"))
                    done.release()

        return on_event

    engine = Engine(
        backend, tokenizer, EngineConfig(prefix_cache=prefix_cache),
        hooks=EngineHooks(on_flush=lambda: held.append(_cells_held(backend))),
    )  # fmt: skip
    engine.start()
    try:
        assert engine.occupancy().kv_cells == POOL
        for r in requests:
            engine.submit(r, sink(r.request_id))
        for _ in requests:
            assert done.acquire(timeout=60)
    finally:
        engine.shutdown()
        backend.close()

    assert all(what in ("first", "end") for _, what in order), order
    at = {event: i for i, event in enumerate(order)}
    assert at["A", "end"] < at["B", "first"], order  # B waited for A's cells
    assert at["A", "end"] < at["C", "first"], order  # C did not pass B in the queue
    assert at["C", "first"] < at["B", "end"], order  # then both fit, and ran together
    assert made == expected
    assert max(held) <= POOL, f"llama.cpp held {max(held)} cells of a {POOL}-cell pool"


def _tokens(engine: Engine, r: GenerationRequest) -> list[int]:
    c = Collector()
    engine.submit(r, c)
    events = c.wait()
    assert events[-1].error is None, events[-1].error
    return [t for e in events for t in e.token_ids]


@needs_llamacpp
def test_a_llamacpp_pool_too_small_for_one_sequence_is_refused(
    pooled_model: tuple[Any, Path],
) -> None:
    with pytest.raises(ValueError, match="raise --kv-cache-mb"):
        _cpp(pooled_model, SEQ_LEN - 1)


def test_llamacpp_pool_is_capped_by_the_budget_and_refuses_one_too_small() -> None:
    from slimserve.engine.backends.llamacpp import pool_cells

    assert pool_cells(16, 1456, 23_040, None) == 16 * 1456
    assert pool_cells(16, 1456, 23_040, 256 * 2**20) == 256 * 2**20 // 23_040
    with pytest.raises(ValueError, match="raise --kv-cache-mb"):
        pool_cells(16, 1456, 23_040, 2**20)
