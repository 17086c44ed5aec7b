"""The llama.cpp backend behind a real server: same API, same answers as the torch backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimserve.clients import Client
from slimserve.engine.backends import llamacpp
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread, publish_tiny

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")


@pytest.fixture(scope="module")
def servers(tiny_registry: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    cpp = ServerThread(tiny_server_config(tiny_registry, backend="llamacpp")).start()
    ref = ServerThread(tiny_server_config(tiny_registry, backend="llama")).start()
    yield cpp, ref
    cpp.stop()
    ref.stop()


def test_generation_and_scores_match_the_torch_backend(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    cpp, ref = servers
    with Client(cpp.target, retries=0, timeout=60) as a, Client(ref.target, retries=0) as b:
        info = a.model_info()
        assert info.backend == "llama.cpp-f32" and info.ref == "tiny@1"  # fp32 artifact: f32
        assert info.kv_bytes_per_sequence > 0
        for prompt in ("the quick brown", "café naïve", "hello world, hello"):
            got = a.generate(prompt, max_new_tokens=12, ignore_eos=True)
            assert got.text == b.generate(prompt, max_new_tokens=12, ignore_eos=True).text
            streamed = "".join(c.text for c in a.stream(prompt, max_new_tokens=12, ignore_eos=True))
            assert streamed == got.text
            sa = a.score(prompt, [" fox", " dog", " über"]).scores
            sb = b.score(prompt, [" fox", " dog", " über"]).scores
            for x, y in zip(sa, sb, strict=True):
                assert x.label == y.label and x.logprob == pytest.approx(y.logprob, abs=1e-3)


def test_auto_uses_llamacpp_on_cpu(tiny_registry: Path) -> None:
    server = ServerThread(tiny_server_config(tiny_registry, backend="auto")).start()
    try:
        with Client(server.target, retries=0) as c:
            assert c.model_info().backend.startswith("llama.cpp")
    finally:
        server.stop()


def test_a_model_llamacpp_cannot_run_is_refused_by_name(tmp_path: Path) -> None:
    from slimserve.engine.config import ModelConfig
    from slimserve.engine.loader import LoadFailed, load
    from slimserve.registry.store import Registry

    publish_tiny(tmp_path, "odd", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    artifact = Registry(tmp_path).get("odd", "")
    # Odd widths serve in f32 but do not split into q8_0's blocks of 32.
    q8 = ModelConfig.of(
        device="cpu", max_batch=1, max_seq_len=64, backend="llamacpp", gguf_type="q8_0"
    )
    with pytest.raises(LoadFailed, match="multiples of 32"):
        load(artifact, q8)
    auto = load(
        artifact, ModelConfig.of(device="cpu", max_batch=1, max_seq_len=64, gguf_type="q8_0")
    )
    try:
        assert (
            auto.engine.backend.name == "llama-static-cache"
        )  # auto falls back, and says why in the log
    finally:
        auto.engine.shutdown()


def test_the_decode_threads_qualified_here_serve_and_are_shown(
    servers: tuple[ServerThread, ServerThread], capsys: pytest.CaptureFixture[str]
) -> None:
    from slimserve.cli import build_parser

    cpp, _ = servers
    with Client(cpp.target, retries=0) as c:
        measured = c.model_info().measured
    threads = measured["decode_threads"]
    assert 1 <= threads <= (os.cpu_count() or 1)
    # Each count raced, best of three runs; the one serving is among them.
    raced = {k for k in measured if k.startswith("decode_tokens_per_s_")}
    assert f"decode_tokens_per_s_{threads:.0f}_threads" in raced
    assert all(measured[k] > 0 for k in raced)
    args = build_parser().parse_args(["models", "--target", cpp.target])
    assert args.func(args) == 0
    assert f"single-sequence decode on {threads:.0f}" in capsys.readouterr().out
