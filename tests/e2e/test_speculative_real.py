"""Speculative decoding on the real default model, on llama.cpp q8_0 (how production serves):
greedy output with a draft is the output without one, token for token, one stream at a time.

Several streams at once are not compared here: llama.cpp's unified KV cache hands the cells
that rejected drafts free to whichever stream asks next, so a stream's attention may sum its
cache in another order, and a near-tie can flip (the same holds for plain continuous
batching as streams come and go). The torch backends keep each slot's cache in position
order; their greedy output with drafts is compared under concurrency in
tests/engine/test_speculative.py."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from slimserve.engine.backends import llamacpp
from slimserve.engine.backends.select import Plan
from slimserve.engine.config import DraftConfig, ModelConfig
from slimserve.engine.loader import load
from slimserve.engine.scheduler import Engine
from slimserve.engine.speculative import ModelDrafter
from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams
from slimserve.registry.store import Registry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,  # drafts against no drafts on the real model: ~75 s
    pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed"),
]

PROMPTS = [
    "List the days of the week, then list them again in reverse order.",
    "Explain recursion with an example in Python.",
    "def fibonacci(n):",
]


def _generate(loaded: Any, n: int = 32) -> list[tuple[list[int], Any]]:
    """Each prompt in turn (batch 1), greedy, EOS ignored."""
    out: list[tuple[list[int], Any]] = [([], None) for _ in PROMPTS]
    done = threading.Semaphore(0)

    def sink(i: int) -> Any:
        def on_event(ev: Any) -> None:
            out[i][0].extend(ev.token_ids)
            if ev.finish is not None or ev.error is not None:
                assert ev.error is None, ev.error
                out[i] = (out[i][0], ev.finish)
                done.release()

        return on_event

    for i, text in enumerate(PROMPTS):
        ids = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        req = GenerationRequest(
            request_id=str(i),
            prompt=Prompt(ids=tuple(ids)),
            sampling=SamplingParams(),
            stopping=StopParams(max_new_tokens=n, ignore_eos=True),
        )
        loaded.engine.submit(req, sink(i))
        assert done.acquire(timeout=600)
    return out


def _config(draft: str | None, policy: str = "always") -> ModelConfig:
    return ModelConfig.of(
        device="cpu", backend="llamacpp", gguf_type="q8_0", max_batch=4, max_seq_len=512,
        qualify=False, engine_process=False, draft=draft, draft_policy=policy,
    )  # fmt: skip


@pytest.mark.parametrize("extra", [False, True], ids=["extra-off", "extra-on"])
def test_greedy_output_with_drafts_equals_output_without_on_the_real_model(
    default_registry: Path, extra: bool
) -> None:
    artifact = Registry(default_registry).get("smollm2-135m-instruct", "1")
    plan = Plan(backend="llamacpp", weights="q8_0", extra_buffers=extra)
    plain = load(artifact, _config(None), plan=plan)
    try:
        want = [ids for ids, _ in _generate(plain)]
        # The model itself as a draft model: every draft is its own greedy choice, so all
        # are accepted, through the draft model's extend, decode and roll-back path.
        backend = plain.engine.backend
    finally:
        plain.engine.shutdown()
    ngram = load(artifact, _config("ngram"), plan=plan)
    try:
        got = _generate(ngram)
    finally:
        ngram.engine.shutdown()
    assert [ids for ids, _ in got] == want
    assert sum(f.timings.draft_proposed for _, f in got) > 0
    # The default policy verifies only drafts that pay on this machine: the same output,
    # from pass costs it measured before serving.
    adaptive = load(artifact, _config("ngram", "adaptive"), plan=plan)
    try:
        assert [ids for ids, _ in _generate(adaptive)] == want
        policy = adaptive.engine.policy  # type: ignore[attr-defined]
        assert policy is not None and {1, 2, 5} <= set(policy.costs.table())
        assert policy.steps_drafted + policy.steps_plain > 0
    finally:
        adaptive.engine.shutdown()
    target = load(artifact, _config(None), plan=plan)
    target.engine.shutdown()  # its backend now serves a new engine with a drafter
    engine = Engine(
        target.engine.backend,  # type: ignore[attr-defined]
        target.tokenizer,
        drafter=ModelDrafter(backend, "self"),
        draft=DraftConfig(source="self", tokens=4, policy="always"),
    )
    engine.start()
    try:
        got = _generate(SimpleNamespace(engine=engine, tokenizer=target.tokenizer))
    finally:
        engine.shutdown()
    assert [ids for ids, _ in got] == want
    proposed = sum(f.timings.draft_proposed for _, f in got)
    accepted = sum(f.timings.draft_accepted for _, f in got)
    assert proposed > 0 and accepted >= 0.9 * proposed
