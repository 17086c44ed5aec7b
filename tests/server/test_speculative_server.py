"""Speculative decoding through the server: a draft model from the registry in the engine
process, the same output as without it, and the draft's figures in timings and model info."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from slimserve.clients import Client
from slimserve.engine.config import ModelConfig
from slimserve.engine.errors import LoadFailed
from slimserve.engine.loader import load, resolve_draft
from slimserve.registry.artifact import publish_model
from slimserve.registry.store import Registry
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread, publish_tiny, tiny_model, tiny_tokenizer

PROMPTS = ["hello world, hello again; hello", "the quick brown fox", "def main(): return"]


@pytest.fixture(scope="module")
def registry(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spec") / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    publish_tiny(root, "drafty", seed=9, num_hidden_layers=1)  # the same tokenizer as tiny
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    model = tiny_model(len(tok), seed=2)
    publish_model(Registry(root), "alien", model, tok, source={"kind": "test"})
    return root


def _outputs(target: str) -> list[Any]:
    with Client(target, retries=0, timeout=120) as c:
        return [c.generate(p, max_new_tokens=24, ignore_eos=True) for p in PROMPTS]


def test_a_draft_model_serves_the_same_tokens_and_reports_its_acceptance(
    registry: Path, tiny_server: Any
) -> None:
    plain = _outputs(tiny_server.target)
    server = ServerThread(
        tiny_server_config(registry, draft="drafty@1", draft_tokens=3, draft_policy="always")
    ).start()
    try:
        spec = _outputs(server.target)
        with Client(server.target, retries=0) as c:
            info = c.model_info("tiny")
    finally:
        server.stop()
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]
    assert [g.text for g in spec] == [g.text for g in plain]
    for g in spec:
        t = g.timings
        assert t.draft == "drafty@1" and t.draft_proposed > 0
        assert t.draft_acceptance_rate == pytest.approx(t.draft_accepted / t.draft_proposed)
    assert info.draft == "drafty@1" and info.draft_tokens == 3
    # The engine's counts since it started: these requests and the warm-up's.
    assert info.draft_proposed >= sum(g.timings.draft_proposed for g in spec)
    assert info.draft_accepted >= sum(g.timings.draft_accepted for g in spec)
    assert info.draft_acceptance_rate == pytest.approx(info.draft_accepted / info.draft_proposed)
    assert plain[0].timings.draft == "" and plain[0].timings.draft_proposed == 0


def test_a_draft_with_another_tokenizer_or_none_at_all_is_refused(registry: Path) -> None:
    reg = Registry(registry)
    for draft, why in (("alien@1", "tokenizer"), ("nosuch@1", "no model")):
        config = ModelConfig.of(
            device="cpu", backend="llama", max_batch=2, max_seq_len=64, draft=draft, warmup=False
        )
        with pytest.raises(Exception, match=why) as err:
            load(reg.get("tiny", "1"), config, draft=resolve_draft(registry, config))
        if why == "tokenizer":
            assert isinstance(err.value, LoadFailed)


def test_ngram_in_process_and_the_hf_backend_refuses_drafts(registry: Path) -> None:
    reg = Registry(registry)
    ngram = ModelConfig.of(
        device="cpu", backend="llama", max_batch=2, max_seq_len=64, draft="ngram"
    )
    loaded = load(reg.get("tiny", "1"), ngram)
    try:
        assert loaded.info.draft == "ngram" and loaded.info.draft_tokens == 4
    finally:
        loaded.engine.shutdown()
    hf = ModelConfig.of(device="cpu", backend="hf", max_batch=2, max_seq_len=64, draft="ngram")
    with pytest.raises(LoadFailed, match="cannot verify drafts"):
        load(reg.get("tiny", "1"), hf)
