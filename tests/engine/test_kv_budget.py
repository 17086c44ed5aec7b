"""The KV cache is bounded by configuration, and GetModelInfo reports its size."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slimserve.engine.backends.select import build_backend
from slimserve.engine.config import ModelConfig
from slimserve.engine.loader import context_length
from slimserve.engine.spec import kv_bytes_per_token
from tests.helpers import tiny_model


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


def test_a_shared_pool_admits_only_what_it_can_hold(tokenizer: Any) -> None:
    """A backend whose slots share one pool of cells (llama.cpp's) has requests wait for room,
    first come first served, instead of overrunning the pool."""
    import threading

    from slimserve.engine.backends.llama import LlamaBackend
    from slimserve.engine.scheduler import Engine
    from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams

    model = tiny_model(len(tokenizer))
    backend = LlamaBackend.from_model(model, max_slots=4, max_seq_len=64, pack_weights=False)
    backend.kv_pool_tokens = 64  # type: ignore[attr-defined]  # one request's worth
    engine = Engine(backend, tokenizer)
    engine.start()
    order: list[tuple[str, str]] = []
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def sink(rid: str) -> Any:
        def on_event(ev: Any) -> None:
            with lock:
                if ev.token_ids and not any(r == rid for r, _ in order):
                    order.append((rid, "first"))
                if ev.finish is not None or ev.error is not None:
                    order.append((rid, "end" if ev.error is None else f"error {ev.error}"))
                    done.release()

        return on_event

    try:
        for i in range(3):
            req = GenerationRequest(
                request_id=str(i),
                prompt=Prompt(ids=tuple(tokenizer("hello world")["input_ids"])),
                sampling=SamplingParams(),
                stopping=StopParams(max_new_tokens=40, ignore_eos=True),
            )
            engine.submit(req, sink(str(i)))
        for _ in range(3):
            assert done.acquire(timeout=60)
    finally:
        engine.shutdown()
    assert order == [(str(i), e) for i in range(3) for e in ("first", "end")]


def test_llamacpp_pool_is_capped_by_the_budget_and_refuses_one_too_small() -> None:
    from slimserve.engine.backends.llamacpp import pool_cells

    assert pool_cells(16, 1456, 23_040, None) == 16 * 1456
    assert pool_cells(16, 1456, 23_040, 256 * 2**20) == 256 * 2**20 // 23_040
    with pytest.raises(ValueError, match="raise --kv-cache-mb"):
        pool_cells(16, 1456, 23_040, 2**20)
