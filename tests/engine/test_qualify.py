"""Qualification in throwaway processes: injected crashing and wrong backends are refused,
`auto` serves by what qualified, and the verdicts are cached per machine."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from slimserve.engine import qualify
from slimserve.engine.backends.select import Plan
from slimserve.engine.config import ModelConfig
from slimserve.engine.manager import ModelManager
from slimserve.engine.qualify import Verdict, choose
from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams
from slimserve.registry.store import Registry

FAULTS = "tests.engine.faults"


@pytest.fixture
def registry(tmp_path: Path, tiny_registry: Path) -> Path:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    return root


@pytest.mark.slow
def test_crashing_and_wrong_backends_are_refused_and_auto_serves_a_qualified_plan(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = tuple(f"{FAULTS}:{f}" for f in ("segfault_on_batch", "wrong_logits", "abort_at_load"))
    config = ModelConfig.of(device="cpu", max_batch=2, max_seq_len=128, backend_plugins=plugins)
    children: list[Any] = []
    real = qualify._run_child

    def counted(*args: Any) -> Any:
        children.append(args[1])
        return real(*args)

    monkeypatch.setattr(qualify, "_run_child", counted)
    manager = ModelManager(Registry(registry), config)
    try:
        info = manager.load("tiny").info
        refused = info.refused
        assert "SIGSEGV" in refused[f"{FAULTS}:segfault_on_batch/float32"]
        assert "SIGABRT" in refused[f"{FAULTS}:abort_at_load/float32"]
        assert refused[f"{FAULTS}:wrong_logits/float32"].startswith("wrong: disagrees")
        assert not info.plan.startswith(FAULTS)
        assert info.measured["decode_tokens_per_s"] > 0
        assert info.measured["probe_perplexity_ratio"] <= qualify.EQUAL_QUALITY
        # It serves: the chosen plan runs the multi-slot shapes in the engine process.
        done: list[Any] = []
        req = GenerationRequest(
            request_id="q",
            prompt=Prompt(ids=(5, 6, 7)),
            sampling=SamplingParams(),
            stopping=StopParams(max_new_tokens=4, ignore_eos=True),
        )
        finished = threading.Event()

        def sink(event: Any) -> None:
            done.append(event)
            if event.finish is not None or event.error is not None:
                finished.set()

        manager.get("tiny").engine.submit(req, sink)
        assert finished.wait(60), "the request never finished"
        assert done[0].accepted is not None and done[-1].error is None
        assert done[-1].finish is not None and done[-1].finish.generated_tokens == 4
        assert len([t for e in done for t in e.token_ids]) == 4
        first = len(children)
        assert first >= 4  # the survey and every plugin, at least
    finally:
        manager.shutdown()
    # A restart on the same machine repeats no qualification.
    again = ModelManager(Registry(registry), config)
    try:
        assert again.load("tiny").info.plan == info.plan
        assert len(children) == first
    finally:
        again.shutdown()
    cache = json.loads((registry / ".qualify" / "verdicts.json").read_text())
    assert any(key.endswith(f"{FAULTS}:wrong_logits/float32") for key in cache["verdicts"])


def _verdict(plan: Plan, ratio: float, speed: float, status: str = "ok") -> Verdict:
    return Verdict(
        plan=plan.to_dict(),
        status=status,
        ppl_ratio=ratio,
        decode_tok_s=speed,
        batch_tok_s=speed,
        prefill_tok_s=speed,
    )


def test_auto_picks_the_fastest_plan_of_equal_quality() -> None:
    ref = Plan(backend="llama")
    bf16 = Plan(backend="llama", dtype="bfloat16")
    fast = Plan(backend="llamacpp", weights="q8_0", extra_buffers=True)
    broken = Plan(backend="llamacpp", weights="q8_0", extra_buffers=False)
    verdicts = [
        _verdict(ref, 1.0, 10.0),
        _verdict(bf16, 1.03, 50.0),  # fast but 3% worse: not raced
        _verdict(fast, 1.004, 30.0),
        _verdict(broken, 1.0, 0.0, status="crashed"),
    ]
    sel = choose([ref, bf16, fast, broken], verdicts, {}, ModelConfig.of())
    assert sel.plan == fast
    assert sel.refused[bf16.key].startswith("worse")
    assert sel.refused[ref.key].startswith("slower")
    assert sel.refused[broken.key].startswith("crashed")
    with pytest.raises(ValueError, match="no plan qualified"):
        choose([broken], [verdicts[3]], {}, ModelConfig.of())


@pytest.mark.slow
def test_a_plan_that_times_out_is_refused_now_and_qualified_again_later(registry: Path) -> None:
    """A timeout says the machine was busy, not that the plan is bad: no verdict is kept."""
    config = ModelConfig.of(
        device="cpu", max_batch=2, max_seq_len=128, backend_plugins=(f"{FAULTS}:hang_at_load",)
    )
    manager = ModelManager(Registry(registry), config)
    manager.qualifier.timeout_s = 20
    cache = manager.qualifier.cache
    try:
        info = manager.load("tiny").info
    finally:
        manager.shutdown()
    key = f"{FAULTS}:hang_at_load/float32"
    assert info.refused[key].startswith("timed-out")
    assert not info.plan.startswith(FAULTS)
    assert not any(k.endswith(key) for k in cache.read()["verdicts"])


def test_a_single_sequence_decodes_on_the_fewest_threads_that_measure_fastest() -> None:
    assert qualify.thread_counts(1) == [1]
    assert qualify.thread_counts(2) == [1, 2]
    assert qualify.thread_counts(12) == [1, 2, 4, 8, 12]
    # Within DECODE_THREADS_SLACK of the best: the fewest win (the rest serve the server).
    assert qualify.fewest_fast_threads({1: 150.0, 2: 152.0}) == 1
    assert qualify.fewest_fast_threads({1: 100.0, 2: 150.0, 4: 152.0}) == 2
    cpp = Plan(backend="llamacpp", weights="q8_0", extra_buffers=True)
    verdict = dataclasses.replace(
        _verdict(cpp, 1.0, 30.0), decode_threads=2, decode_by_threads={"1": 100.0, "2": 150.0}
    )
    sel = choose([cpp], [verdict], {}, ModelConfig.of())
    assert sel.plan.decode_threads == 2 and sel.plan.key == cpp.key
    assert sel.measured["decode_threads"] == 2
    assert sel.measured["decode_tokens_per_s_1_threads"] == 100.0
    # An operator's --decode-threads is what serves, and what is shown.
    pinned = choose([cpp], [verdict], {}, ModelConfig.of(decode_threads=1))
    assert pinned.measured["decode_threads"] == 1
    # A llama.cpp verdict cached before threads were raced is qualified again.
    assert _verdict(cpp, 1.0, 30.0).stale and not verdict.stale
    assert not _verdict(Plan(backend="llama"), 1.0, 10.0).stale
