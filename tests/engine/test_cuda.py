"""GPU checks; skipped without CUDA (see the `cuda` marker in tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers import tiny_model

pytestmark = pytest.mark.cuda


def test_llama_backend_on_cuda_matches_transformers(tokenizer: Any) -> None:
    from slimserve.engine.backends.llama import LlamaBackend

    model = tiny_model(len(tokenizer)).to("cuda")
    backend = LlamaBackend.from_model(
        model, max_slots=2, max_seq_len=64, dtype=torch.float32, device="cuda"
    )
    ids = [5, 17, 42, 99, 7]
    with torch.inference_mode():
        want = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
    got = backend.prefill(0, ids)
    assert torch.allclose(got, want, atol=1e-3)


def test_server_resolves_auto_device_to_cuda() -> None:
    from slimserve.engine.loader import resolve_device, resolve_dtype

    device = resolve_device("auto")
    assert device.type == "cuda"
    assert resolve_dtype("auto", device) == torch.bfloat16
