"""The one-token chat probe's in-process peer: llama-cpp-python's `Llama` in a worker of its
own on the GGUF slimserve serves, timed there, and slimserve's p50 held against its. Real
worker processes on the tiny model's exported GGUF; the full race with real servers is slow."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from slimserve.bench import serve as bench
from slimserve.bench.http_load import chat_question
from slimserve.bench.llama_server import export_served_gguf
from slimserve.bench.worker import stream_tokens
from slimserve.cli import build_parser
from slimserve.engine.backends import llamacpp
from slimserve.engine.config import ModelConfig

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def served(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model's GGUF as slimserve's llama.cpp backend serves it, and its template."""
    import torch

    torch.set_num_threads(2)  # what the bench's `serve --threads 2` qualifies for
    config = ModelConfig.of(
        device="cpu", backend="llamacpp", max_batch=2, max_seq_len=stream_tokens(NEW_TOKENS)
    )
    gguf, template, _ = export_served_gguf(
        tiny_registry, "tiny@1", config, tmp_path_factory.mktemp("gguf")
    )
    assert template is not None  # the tiny tokenizer has a chat template
    return gguf, template


def _bench(
    registry: Path, gguf: Path, template: Path | None, systems: list[str] | None = None, **kw: Any
) -> bench.Bench:
    return bench.Bench(
        registry=registry,
        model="tiny@1",
        threads=2,
        new_tokens=NEW_TOKENS,
        concurrency=[1],
        repeats=1,
        systems=systems or [],
        gguf=None,
        max_batch=2,
        backend="llamacpp",
        served_gguf=gguf,
        chat_template=template,
        chat_peer=True,
        **kw,
    )


def _chat_ids(registry: Path, question: str) -> list[int]:
    from slimserve.engine.tokenizer import load_tokenizer
    from slimserve.registry.store import Registry

    tok = load_tokenizer(Registry(registry).get("tiny", "1").path)
    ids = tok.apply_chat_template([{"role": "user", "content": question}],
                                  add_generation_prompt=True)  # fmt: skip
    assert isinstance(ids, list)
    return ids


def test_the_peer_worker_answers_n_chat_requests_timed_in_its_own_process(
    tiny_registry: Path, served: tuple[Path, Path]
) -> None:
    gguf, template = served
    worker = bench._Worker(bench.PEER_WORKER, _bench(tiny_registry, gguf, template))
    try:
        assert worker.served.startswith("llama-cpp-python ") and gguf.name in worker.served
        out = worker.chat_probe(5)
        assert out["n"] == 5 and 0 < out["p50_ms"] <= out["p90_ms"]
        # The artifact's own template wraps the last question, as slimserve renders it.
        assert out["prompt_tokens"] == len(_chat_ids(tiny_registry, chat_question(4)))
        assert worker.chat_probe(2)["n"] == 2  # the worker stays for another probe
        assert "chat probes only" in worker.run(["Hello"], 2)["error"]  # not a raced system
        assert worker.alive()
    finally:
        worker.close()


def test_slimserve_p50_is_held_against_the_peers_over_grpc_and_http() -> None:
    chat = {
        "slimserve": {"n": 30, "p50_ms": 52.0, "p90_ms": 60.0},
        "slimserve_http": {"n": 30, "p50_ms": 30.0, "p90_ms": 33.0},
        "llama_server": {"n": 30, "p50_ms": 10.0, "p90_ms": 12.0},  # no target of its own
        bench.CHAT_PEER: {"n": 30, "p50_ms": 26.0, "p90_ms": 28.0, "served": "llama-cpp-python"},
    }
    grpc, http = bench.chat_targets(chat)
    assert grpc.value == pytest.approx(2.0) and not grpc.passed
    assert http.value == pytest.approx(30.0 / 26.0) and http.passed
    assert grpc.line() == (
        "one-token chat on a new user message, p50 of 30, slimserve over gRPC vs "
        "llama-cpp-python in-process on the same weights (slimserve 52.0 vs "
        "llama_cpp_python 26.0 ms): 2.000x (target <= 1.3x) MISS"
    )
    assert http.line().endswith("(slimserve_http 30.0 vs llama_cpp_python 26.0 ms): 1.154x "
                                "(target <= 1.3x) PASS")  # fmt: skip
    # No peer figure (it failed, or did not run): no ratio.
    assert bench.chat_targets({**chat, bench.CHAT_PEER: {"error": "did not start: x"}}) == []
    assert bench.chat_targets({"slimserve": chat["slimserve"]}) == []


def test_a_peer_that_cannot_load_its_gguf_records_why(tiny_registry: Path, tmp_path: Path) -> None:
    out = bench.chat_peer_probe(_bench(tiny_registry, tmp_path / "missing.gguf", None))
    assert out["error"].startswith("did not start: RuntimeError: exited with 1")


def test_the_peer_is_skipped_with_a_line_where_no_gguf_is_served(
    tiny_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimserve.cli.bench import _chat_peer

    def args(*extra: str) -> argparse.Namespace:
        return build_parser().parse_args(["bench", "serve", "--model", "tiny@1", *extra])

    # The torch backend serves it: no GGUF is served, so none is raced.
    assert _chat_peer(args("--backend", "llama"), tiny_registry, ["slimserve"]) == {}
    err = capsys.readouterr().err
    assert err.startswith("llama_cpp_python: ") and "not llama.cpp" in err
    assert err.rstrip().endswith("the chat probe runs without its in-process peer")
    # No probe, or no server to probe: nothing to hold it against, and nothing printed.
    assert _chat_peer(args("--chat-probe", "0"), tiny_registry, ["slimserve"]) == {}
    assert _chat_peer(args(), tiny_registry, ["engine"]) == {}
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # two real servers on the llama.cpp backend, then the peer
@pytest.mark.timeout(600)
def test_a_race_probes_the_servers_and_the_peer_and_reports_the_ratios(
    tiny_registry: Path, served: tuple[Path, Path]
) -> None:
    from slimserve.cli.bench import _prompt_ids

    gguf, template = served
    b = _bench(
        tiny_registry,
        gguf,
        template,
        systems=["slimserve", "slimserve_http"],
        prompt_ids=_prompt_ids(tiny_registry, "tiny@1"),
        chat_probe=4,
    )
    report = bench.run(b, score=False)
    chat = report["chat_probe"]
    assert set(chat) == {"slimserve", "slimserve_http", bench.CHAT_PEER}
    for r in chat.values():
        assert "error" not in r, r
        assert r["n"] == 4 and 0 < r["p50_ms"] <= r["p90_ms"]
    assert gguf.name in chat[bench.CHAT_PEER]["served"]
    peer = chat[bench.CHAT_PEER]["p50_ms"]
    ratios = {t["label"].split(" vs llama-cpp-python")[0]: t for t in report["targets"]}
    for system, door in bench.CHAT_TARGET_SYSTEMS:
        t = ratios[f"one-token chat on a new user message, p50 of 4, slimserve over {door}"]
        assert t["value"] == pytest.approx(chat[system]["p50_ms"] / peer)
        assert t["goal"] == 1.3 and t["at_most"] and t["passed"] == (t["value"] <= 1.3)
    lines = bench.report_lines(report)
    assert sum("llama-cpp-python in-process on the same weights" in ln for ln in lines) == 2
    assert any(ln.startswith(f"one-token chat on a new user message, {bench.CHAT_PEER} (")
               for ln in lines)  # fmt: skip
