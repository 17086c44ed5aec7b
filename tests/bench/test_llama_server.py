"""llama.cpp's own `llama-server` raced by `bench serve` on the weights slimserve serves,
through the same openai client. Runs only where a llama-server is on PATH or was built for
this CPU (scripts/build-llama-server): the test never builds one."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.bench import serve as bench
from slimserve.bench.llama_server import export_served_gguf, find_binary
from slimserve.bench.worker import stream_tokens
from slimserve.cli.bench import _prompt_ids, llama_server_cache
from slimserve.engine.backends import llamacpp
from slimserve.engine.config import ModelConfig

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,  # builds or finds llama-server, then races it
    pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed"),
    pytest.mark.timeout(600),
]


def test_llama_server_races_on_the_gguf_slimserve_serves(
    tiny_registry: Path, tmp_path: Path
) -> None:
    binary = find_binary(llama_server_cache())
    if binary is None:
        pytest.skip("no llama-server on PATH or built for this CPU (scripts/build-llama-server)")
    import torch

    torch.set_num_threads(2)  # what the bench's `serve --threads 2` qualifies for
    new_tokens = 8
    config = ModelConfig.of(
        device="cpu", backend="llamacpp", max_batch=2, max_seq_len=stream_tokens(new_tokens)
    )
    gguf, template, plan = export_served_gguf(tiny_registry, "tiny@1", config, tmp_path)
    assert plan.startswith("llamacpp/f32/") and gguf.stat().st_size > 0
    assert template is not None  # the tiny tokenizer has a chat template
    again = export_served_gguf(tiny_registry, "tiny@1", config, tmp_path)
    assert again[0] == gguf  # written once
    b = bench.Bench(
        registry=tiny_registry,
        model="tiny@1",
        threads=2,
        new_tokens=new_tokens,
        concurrency=[1, 2],
        repeats=1,
        systems=["slimserve_http", "llama_server"],
        gguf=None,
        max_batch=2,
        backend="llamacpp",
        llama_server=binary,
        served_gguf=gguf,
        chat_template=template,
        prompt_ids=_prompt_ids(tiny_registry, "tiny@1"),
        chat_probe=3,
    )
    report = bench.run(b, score=False)
    rows = {(r["system"], r["concurrency"]): r for r in report["results"]}
    for system in ("slimserve_http", "llama_server"):
        for c in (1, 2):
            r = rows[(system, c)]
            assert "error" not in r, r
            assert r["tokens_per_s"] > 0 and r["ttft_ms_p50"] > 0
        assert report["chat_probe"][system]["p50_ms"] > 0
    served = report["environment"]["served"]["llama_server"]
    assert served.startswith("llama-server") and gguf.name in served
    lines = bench.side_by_side(report["results"])
    assert any(ln.startswith("slimserve_http vs llama_server, c=2") for ln in lines)
