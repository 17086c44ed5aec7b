"""Persistent ggml threadpools on a real llama.cpp context (the tiny model, float32): made,
attached and freed without leaking a thread, and the same greedy tokens with and without
them, whatever thread count a single-sequence decode runs on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from slimserve.engine.backends import ggml_threads, llamacpp
from tests.helpers import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=5)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return model, out / "tokenizer.json"


def _backend(tiny: tuple[Any, Path], **kw: Any) -> llamacpp.LlamaCppBackend:
    model, tokenizer_json = tiny
    return llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tokenizer_json, max_slots=2, max_seq_len=64,
        threads=2, weight_type="f32", kv_layout="unified", **kw,
    )  # fmt: skip


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_pools_are_attached_and_freed_without_leaking_threads(tiny: tuple[Any, Path]) -> None:
    assert ggml_threads.unavailable_reason() is None  # the struct read back as ggml.h says
    _backend(tiny).close()  # torch's and llama.cpp's own threads start once, here
    before = _threads()
    for _ in range(3):
        b = _backend(tiny, decode_threads=1)
        assert b.phase_threads.describe() == "decode 1 of 2 threads, persistent pools (poll 0)"
        assert _threads() == before + 1  # the 2-thread pool's worker; a 1-thread pool has none
        b.prefill(0, [5, 6, 7])
        b.decode([0], [8])
        b.set_decode_threads(2)  # reuses the 2-thread pool
        b.decode([0], [9])
        b.set_decode_threads(1)
        b.decode([0], [10])
        assert _threads() == before + 1
        b.close()
        b.close()  # idempotent
        assert _threads() == before
    per_call = _backend(tiny, threadpool=False)
    per_call.prefill(0, [5, 6, 7])
    assert _threads() == before  # llama.cpp's own pool lives only during a call
    assert per_call.phase_threads.describe() == "decode 2 of 2 threads, a pool per call"
    per_call.close()


def _greedy(b: llamacpp.LlamaCppBackend) -> list[int]:
    """Tokens of slot 0 decoding alone (one-token passes), then of both slots (batched)."""
    out = []
    logits = b.prefill(0, [5, 6, 7, 8])
    for _ in range(6):
        out.append(int(logits.argmax()))
        logits = b.decode([0], [out[-1]])[0]
    other = int(b.prefill(1, [9, 10, 11]).argmax())
    last = [int(logits.argmax()), other]
    for _ in range(6):
        rows = b.decode([0, 1], last)
        last = [int(rows[0].argmax()), int(rows[1].argmax())]
        out += last
    return out


@pytest.mark.parametrize(
    "kw", [{"decode_threads": 1}, {"decode_threads": 2}, {"threadpool": False, "decode_threads": 1}]
)
def test_greedy_tokens_equal_those_on_llamacpps_own_pools(
    tiny: tuple[Any, Path], kw: dict[str, Any]
) -> None:
    reference = _backend(tiny, threadpool=False)
    want = _greedy(reference)
    reference.close()
    b = _backend(tiny, **kw)
    assert _greedy(b) == want
    b.close()


def test_bad_thread_counts_are_refused(tiny: tuple[Any, Path]) -> None:
    with pytest.raises(ValueError, match=r"decode_threads must be 0\.\.threads"):
        _backend(tiny, decode_threads=3)
    b = _backend(tiny)
    with pytest.raises(ValueError, match=r"decode threads must be 1\.\.threads"):
        b.set_decode_threads(0)
    b.close()
    with pytest.raises(ValueError, match=r"1\.\.512 threads"):
        ggml_threads.Threadpool(0)
