"""Serving on the configured accelerator, held to the CPU float32 reference.

On `cuda` (the real default model; `scripts/cuda-check` runs these on a lent GPU): a
version served in bfloat16 and in float32 through the engine process, greedy tokens and
Score log-probabilities compared with transformers in float32 on the CPU, seeded sampling,
and a real out-of-memory error on the GPU answered RESOURCE_EXHAUSTED while the engine
goes on serving. On `cpu` the same checks run on the tiny test model, so they cannot rot.
Measured figures go to the JUnit report (`record_property`), which the check summarises.
"""

from __future__ import annotations

import os
import statistics
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slimserve.clients import Client, Overloaded, Sampling
from tests.cuda.conftest import Served, start_server
from tests.cuda.reference import (
    BF16_MEAN_MARGIN_NATS,
    BF16_MIN_AGREEMENT,
    SCORE_TOL_BF16,
    SCORE_TOL_FP32,
    TIE_NATS,
    TIE_NATS_FP32,
    first_divergence,
    margins,
    within,
)
from tests.helpers import ServerThread

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Water boils at",
    "Once upon a time, in a small village,",
]
NEW_TOKENS = 32
OOM_PROMPT = "Tell me about the history of the city of Paris"
SCORED = ("The capital of France is", [" Paris", " London", " a city in Europe"])

Record = Callable[[str, object], None]


def _engine(server: ServerThread, served: Served) -> Any:
    return server.server.models.get(served.name).engine


def _served_on(c: Client, server: ServerThread, served: Served, device: str, dtype: str) -> None:
    info = c.model_info()
    assert info.device.startswith(device), info.device
    assert info.dtype == dtype
    engine = _engine(server, served)
    assert engine.pid is not None and engine.pid != os.getpid()  # its own process


def _check_scores(c: Client, served: Served, tol: tuple[float, float], record: Record) -> None:
    prompt, labels = SCORED
    got = c.score(prompt, labels)
    prompt_ids = c.tokenize(prompt)
    worst = 0.0
    for s in got.scores:
        want = served.reference.score(prompt_ids, s.label)
        assert within(s.logprob, want, tol), (s.label, s.logprob, want)
        worst = max(worst, abs(s.logprob - want))
    record("score_max_abs_diff_nats", round(worst, 5))


def test_bf16_through_the_engine_process_matches_the_float32_reference(
    bf16_server: ServerThread, served: Served, device: str, record_property: Record
) -> None:
    with Client(bf16_server.target, retries=0, timeout=120) as c:
        _served_on(c, bf16_server, served, device, "bfloat16")
        gaps: list[float] = []
        identical = 0
        for prompt in PROMPTS:
            prompt_ids = c.tokenize(prompt)
            got = c.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, token_ids=True)
            assert len(got.token_ids) == NEW_TOKENS
            gaps += margins(served.reference, prompt_ids, got.token_ids)
            identical += list(got.token_ids) == served.reference.greedy(prompt_ids, NEW_TOKENS)
        agreement = sum(g <= TIE_NATS for g in gaps) / len(gaps)
        record_property("bf16_greedy_agreement", round(agreement, 4))
        record_property("bf16_greedy_mean_margin_nats", round(statistics.mean(gaps), 4))
        record_property("bf16_greedy_max_margin_nats", round(max(gaps), 4))
        record_property("bf16_prompts_identical_to_fp32", f"{identical} of {len(PROMPTS)}")
        assert agreement >= BF16_MIN_AGREEMENT
        assert statistics.mean(gaps) <= BF16_MEAN_MARGIN_NATS
        _check_scores(c, served, SCORE_TOL_BF16, record_property)


def test_fp32_on_the_device_is_the_reference_token_for_token(
    served: Served, device: str, record_property: Record
) -> None:
    server = start_server(served, device, "float32")
    try:
        with Client(server.target, retries=0, timeout=120) as c:
            _served_on(c, server, served, device, "float32")
            identical, ties = 0, []
            for prompt in PROMPTS:
                prompt_ids = c.tokenize(prompt)
                got = c.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, token_ids=True)
                want = served.reference.greedy(prompt_ids, NEW_TOKENS)
                at, gap = first_divergence(served.reference, prompt_ids, got.token_ids, want)
                if at is None:
                    identical += 1
                else:  # only where the reference itself is torn between the two
                    ties.append((prompt, at, gap))
                    assert gap <= TIE_NATS_FP32, (prompt, at, gap)
            record_property("fp32_prompts_identical", f"{identical} of {len(PROMPTS)}")
            record_property("fp32_divergences_at_ties", repr(ties))
            _check_scores(c, served, SCORE_TOL_FP32, record_property)
    finally:
        server.stop()


def test_seeded_sampling_and_penalties_run_on_the_device(
    bf16_server: ServerThread, device: str
) -> None:
    """Sampling draws with the request's own (CPU) generator and penalties index the tokens
    seen: both must work on logits that live on the device."""
    seeded = Sampling(do_sample=True, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    with Client(bf16_server.target, retries=0, timeout=120) as c:
        runs = [
            c.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True, token_ids=True,
                       sampling=seeded).token_ids
            for _ in range(2)
        ]  # fmt: skip
        assert runs[0] == runs[1] and len(runs[0]) == 16
        penalised = c.generate(
            PROMPTS[1], max_new_tokens=16, ignore_eos=True, token_ids=True,
            sampling=Sampling(repetition_penalty=1.3),
        )  # fmt: skip
        assert len(penalised.token_ids) == 16


@pytest.mark.cuda
def test_cuda_out_of_memory_is_resource_exhausted_and_the_engine_keeps_serving(
    tiny_registry: Path, record_property: Record
) -> None:
    from tests.cuda import faults
    from tests.cuda.reference import Reference

    served = Served(tiny_registry, "tiny@1", Reference.load(tiny_registry, "tiny@1"))
    trigger = faults.trigger_file(tiny_registry)
    trigger.unlink(missing_ok=True)
    server = start_server(
        served, "cuda", "float32", backend_plugins=("tests.cuda.faults:oom_on_trigger",),
        qualify=False,
    )  # fmt: skip
    try:
        engine = _engine(server, served)
        pid = engine.pid
        with Client(server.target, retries=0, timeout=120) as c:
            assert c.model_info().backend == "fault-oom-on-trigger"
            before = c.generate("hello", max_new_tokens=16, ignore_eos=True, token_ids=True)
            # A stream decoding on the GPU while another request runs out of memory.
            stream = c.stream("hello", max_new_tokens=200, ignore_eos=True, token_ids=True)
            first = next(stream)
            rest: list[Any] = []
            reader = threading.Thread(target=lambda: rest.extend(stream))
            reader.start()
            trigger.touch()
            try:
                # A prompt of several tokens: its prefill holds a whole prompt's activations.
                with pytest.raises(Overloaded, match="out of memory") as gen_err:
                    c.generate(OOM_PROMPT, max_new_tokens=4)
                with pytest.raises(Overloaded, match="out of memory"):
                    c.score(OOM_PROMPT, [" a", " b"])
            finally:
                trigger.unlink()
            reader.join(120)
            streamed = [t for chunk in [first, *rest] for t in chunk.token_ids]
            assert len(streamed) == 200 and tuple(streamed[:16]) == before.token_ids
            after = c.generate("hello", max_new_tokens=16, ignore_eos=True, token_ids=True)
            assert after.token_ids == before.token_ids
            assert c.score("hello", [" a", " b"]).scores
            assert c.health() == "SERVING"
        assert engine.pid == pid and engine.restarts == 0  # the same process served on
        record_property("oom_error", str(gen_err.value)[:200])
    finally:
        trigger.unlink(missing_ok=True)
        server.stop()


def test_the_checks_hold_a_wrong_device_to_account(served: Served) -> None:
    """The comparisons are not vacuous: tokens the reference does not pick fail them."""
    prompt_ids = served.reference.tokenizer("The capital of France is")["input_ids"]
    good = served.reference.greedy(prompt_ids, 8)
    bad = [(t + 7) % len(served.reference.tokenizer) for t in good]
    assert max(margins(served.reference, prompt_ids, good)) == 0.0
    gaps = margins(served.reference, prompt_ids, bad)
    assert statistics.mean(gaps) > 0
    at, gap = first_divergence(served.reference, prompt_ids, bad, good)
    assert at == 0 and gap > 0
