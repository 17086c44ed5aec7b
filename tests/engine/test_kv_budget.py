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
    cfg = ModelConfig(device="cpu", max_batch=8, kv_cache_mb=1)
    n = context_length(model, cfg, torch.float32)
    assert n == 2**20 // (per_token * 8)
    backend = build_backend(model, cfg, n)
    assert backend.kv_bytes_per_slot() * cfg.max_batch <= 2**20


def test_an_explicit_size_over_budget_is_refused_naming_the_flags(tokenizer: Any) -> None:
    model = tiny_model(len(tokenizer))
    cfg = ModelConfig(device="cpu", max_batch=64, max_seq_len=4096, kv_cache_mb=1)
    with pytest.raises(ValueError, match="kv_cache_mb=1; raise --kv-cache-mb"):
        context_length(model, cfg, torch.float32)


def test_a_budget_too_small_for_any_useful_context_is_refused(tokenizer: Any) -> None:
    model = tiny_model(len(tokenizer))
    cfg = ModelConfig(device="cpu", max_batch=4096, kv_cache_mb=1)
    with pytest.raises(ValueError, match="tokens per sequence"):
        context_length(model, cfg, torch.float32)
