"""Scheduler behaviour on a tiny model: batching, cancellation, limits, stops."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from slimserve.engine.backends import llamacpp
from slimserve.engine.backends.base import Feed
from slimserve.engine.backends.hf import HFBackend
from slimserve.engine.config import DraftConfig, EngineConfig
from slimserve.engine.errors import (
    DeadlineExpired,
    EngineFailure,
    InvalidRequest,
    NotReady,
    Overloaded,
)
from slimserve.engine.scheduler import Engine, EngineHooks
from slimserve.engine.sequence import Handle, Sequence
from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams, StopReason
from tests.helpers import Collector, tiny_model


@pytest.fixture()
def model(tokenizer: Any) -> Any:
    return tiny_model(len(tokenizer), seed=1)


def make_engine(model: Any, tokenizer: Any, slots: int = 4, queue: int = 8, **kw: Any) -> Engine:
    backend = kw.pop("backend", None) or HFBackend(model, max_slots=slots, max_seq_len=128)
    eos = kw.pop("eos_token_ids", frozenset())
    hooks = kw.pop("hooks", None)
    engine = Engine(
        backend, tokenizer, EngineConfig(max_queue=queue, **kw), eos_token_ids=eos, hooks=hooks
    )
    engine.start()
    return engine


@pytest.fixture()
def engine(model: Any, tokenizer: Any) -> Iterator[Engine]:
    eng = make_engine(model, tokenizer)
    yield eng
    eng.shutdown()


def request(
    tokenizer: Any, prompt: str, n: int = 12, rid: str = "r", **stop: Any
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt=Prompt(ids=tuple(tokenizer(prompt)["input_ids"])),
        sampling=SamplingParams(),
        stopping=StopParams(max_new_tokens=n, ignore_eos=stop.pop("ignore_eos", True), **stop),
    )


def run_one(engine: Engine, req: GenerationRequest) -> list[Any]:
    c = Collector()
    engine.submit(req, c)
    return c.wait()


def generated_ids(events: list[Any]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def test_greedy_matches_transformers_generate(engine: Engine, model: Any, tokenizer: Any) -> None:
    req = request(tokenizer, "the quick brown", n=16)
    events = run_one(engine, req)
    ref = model.generate(
        torch.tensor([req.prompt_ids]), max_new_tokens=16, do_sample=False, eos_token_id=None
    )[0, len(req.prompt_ids) :].tolist()
    assert generated_ids(events) == ref
    fin = events[-1].finish
    assert fin.reason is StopReason.MAX_TOKENS and fin.generated_tokens == 16
    assert "".join(e.text for e in events) == tokenizer.decode(ref)


def test_requests_joining_and_leaving_mid_batch_match_running_alone(
    model: Any, tokenizer: Any
) -> None:
    prompts = ["the quick brown", "café naïve", "hello world, hello", "def main():"]
    lengths = [20, 5, 14, 9]
    alone = make_engine(model, tokenizer, slots=1)
    try:
        expected = [
            generated_ids(run_one(alone, request(tokenizer, p, n)))
            for p, n in zip(prompts, lengths, strict=True)
        ]
    finally:
        alone.shutdown()
    eng = make_engine(model, tokenizer, slots=4)
    try:
        collectors = []
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            c = Collector()
            eng.submit(request(tokenizer, p, n, rid=str(i)), c)
            collectors.append(c)
            time.sleep(0.02 * i)  # staggered arrivals join a running batch
        got = [generated_ids(c.wait()) for c in collectors]
        assert eng.stats().steps < sum(lengths)  # they really shared decode steps
    finally:
        eng.shutdown()
    assert got == expected


class _SlowBackend(HFBackend):
    """Counts decode steps and can pause, so tests can act between steps."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.steps = 0
        self.slots_per_step: list[list[int]] = []

    def decode(self, slots: list[int], token_ids: list[int]) -> torch.Tensor:
        self.steps += 1
        self.slots_per_step.append(list(slots))
        time.sleep(0.01)
        return super().decode(slots, token_ids)


def test_cancel_frees_the_slot_within_one_step(model: Any, tokenizer: Any) -> None:
    backend = _SlowBackend(model, max_slots=2, max_seq_len=128)
    eng = make_engine(model, tokenizer, backend=backend)
    try:
        c = Collector()
        handle = eng.submit(request(tokenizer, "the quick", n=100), c)
        while backend.steps < 3:
            time.sleep(0.005)
        handle.cancel()
        step_at_cancel = backend.steps
        events = c.wait()
        assert events[-1].finish.reason is StopReason.CANCELLED
        # At most the step already running when cancel() was called, then it is gone.
        assert backend.steps <= step_at_cancel + 1
        stats = eng.stats()
        assert stats.running == 0 and stats.free_slots == 2
    finally:
        eng.shutdown()


def test_queue_bound_is_enforced(model: Any, tokenizer: Any) -> None:
    backend = _SlowBackend(model, max_slots=1, max_seq_len=128)
    eng = make_engine(model, tokenizer, backend=backend, queue=2)
    try:
        handles = [
            eng.submit(request(tokenizer, "the", n=50, rid=str(i)), Collector()) for i in range(3)
        ]
        with pytest.raises(Overloaded, match="admission queue full"):
            eng.submit(request(tokenizer, "the", n=50, rid="x"), Collector())
        for h in handles:
            h.cancel()
    finally:
        eng.shutdown()


def test_stop_sequence_straddling_tokens_is_honoured(engine: Engine, tokenizer: Any) -> None:
    full = "".join(e.text for e in run_one(engine, request(tokenizer, "hello world", n=24)))
    assert len(full) > 6
    # A stop string that starts inside one token and ends in another.
    stop = full[3:7]
    events = run_one(engine, request(tokenizer, "hello world", n=24, stop_sequences=(stop,)))
    text = "".join(e.text for e in events)
    assert events[-1].finish.reason is StopReason.STOP_SEQUENCE
    assert events[-1].finish.stop_sequence == stop
    assert text == full[: full.index(stop)]


def test_deadline_and_time_limit(engine: Engine, tokenizer: Any) -> None:
    req = request(tokenizer, "the quick", n=100)
    past = GenerationRequest(
        request_id="late",
        prompt=Prompt(ids=req.prompt_ids),
        sampling=req.sampling,
        stopping=req.stopping,
        deadline=time.monotonic() - 1,
    )
    # Its own stop reason (it was CANCELLED, and the servicer re-read the clock to tell).
    assert run_one(engine, past)[-1].finish.reason is StopReason.DEADLINE
    limited = request(tokenizer, "the quick", n=10_000, time_limit_s=0.05)
    assert run_one(engine, limited)[-1].finish.reason in (
        StopReason.TIME_LIMIT,
        StopReason.TOKEN_LIMIT,
    )


def test_context_limit_ends_with_token_limit(model: Any, tokenizer: Any) -> None:
    backend = HFBackend(model, max_slots=1, max_seq_len=12)
    eng = make_engine(model, tokenizer, backend=backend)
    try:
        req = request(tokenizer, "the quick brown", n=100)
        events = run_one(eng, req)
        assert events[-1].finish.reason is StopReason.TOKEN_LIMIT
        assert len(req.prompt_ids) + events[-1].finish.generated_tokens == 12
    finally:
        eng.shutdown()


def test_score_matches_logits(engine: Engine, model: Any, tokenizer: Any) -> None:
    prompt = tokenizer("the quick")["input_ids"]
    labels = [tokenizer(" brown")["input_ids"], tokenizer(" fox jumps")["input_ids"]]
    got = engine.score(prompt, labels).result(30)
    for label, lp in zip(labels, got, strict=True):
        ids = torch.tensor([prompt + label])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        want = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(label))
        assert abs(lp - want) < 1e-4


def test_eos_stops_unless_ignored(model: Any, tokenizer: Any) -> None:
    # Make the tiny model's first greedy token its EOS, so EOS must end the request.
    first = generated_ids(
        run_one(eng := make_engine(model, tokenizer), request(tokenizer, "the", n=1))
    )[0]
    eng.shutdown()
    eng = make_engine(model, tokenizer, eos_token_ids=frozenset({first}))
    try:
        events = run_one(eng, request(tokenizer, "the", n=10, ignore_eos=False))
        assert events[-1].finish.reason is StopReason.EOS_TOKEN
        assert events[-1].finish.generated_tokens == 1
        events = run_one(eng, request(tokenizer, "the", n=10, ignore_eos=True))
        assert events[-1].finish.reason is StopReason.MAX_TOKENS
    finally:
        eng.shutdown()


def test_a_failing_request_does_not_stop_the_engine(model: Any, tokenizer: Any) -> None:
    """An exception while sampling one request fails that request only."""
    eng = make_engine(model, tokenizer)
    try:
        bad = GenerationRequest(
            request_id="bad",
            prompt=Prompt(ids=tuple(tokenizer("the")["input_ids"])),
            # Such a temperature overflows the logits: torch.multinomial raises on NaN.
            sampling=SamplingParams(do_sample=True, temperature=1e-40, seed=1),
            stopping=StopParams(max_new_tokens=4),
        )
        c = Collector()
        eng.submit(bad, c)
        events = c.wait()
        assert events[-1].error is not None
        assert eng.stats().free_slots == 4
        ok = run_one(eng, request(tokenizer, "the quick", n=3))
        assert ok[-1].finish.reason is StopReason.MAX_TOKENS
    finally:
        eng.shutdown()


def test_a_large_score_interleaves_with_decode_steps(model: Any, tokenizer: Any) -> None:
    # 12 labels of ~20 tokens each; a budget of 40 tokens a step runs them ~2 at a time,
    # with a decode step for the running stream between chunks.
    eng = make_engine(model, tokenizer, score_step_tokens=40)
    try:
        prompt = tokenizer("the quick brown fox jumps")["input_ids"]
        labels = [tokenizer(f" label {i} over the lazy dog")["input_ids"] for i in range(12)]
        alone = eng.backend.score(prompt, labels)
        events: list[Any] = []
        eng.submit(request(tokenizer, "hello", n=40), events.append)
        got = eng.score(prompt, labels).result(30)
        assert got == pytest.approx(alone, abs=1e-4)  # chunking changes no sum
        assert 0 < len([e for e in events if e.token_ids]) < 40  # the stream ran meanwhile
    finally:
        eng.shutdown()


def test_score_limits_and_deadline(model: Any, tokenizer: Any) -> None:
    eng = make_engine(model, tokenizer, score_step_tokens=8, max_score_tokens=200)
    try:
        prompt = tokenizer("the quick brown fox")["input_ids"]
        with pytest.raises(InvalidRequest, match="the limit is 200"):
            eng.score(prompt, [prompt * 10] * 10)
        labels = [[5, 6, 7]] * 20
        with pytest.raises(DeadlineExpired, match="labels"):
            eng.score(prompt, labels, deadline=time.monotonic() - 1).result(30)
    finally:
        eng.shutdown()


def test_a_non_finite_score_is_an_error_never_a_value(model: Any, tokenizer: Any) -> None:
    eng = make_engine(model, tokenizer)
    try:
        eng.backend.score_batch = lambda jobs: [[float("nan")] * len(c) for _, c in jobs]
        with pytest.raises(EngineFailure, match="non-finite"):
            eng.score([1, 2, 3], [[4], [5]]).result(30)
    finally:
        eng.shutdown()


def test_a_failed_loop_fails_pending_requests_and_stops_serving(model: Any, tokenizer: Any) -> None:
    failures: list[BaseException] = []
    eng = make_engine(model, tokenizer, hooks=EngineHooks(on_failure=failures.append))
    try:

        def broken() -> None:
            raise RuntimeError("a bug in the loop")

        eng._reap = broken  # type: ignore[method-assign]  # the loop itself, not a request
        events = run_one(eng, request(tokenizer, "hello", n=5))
        assert isinstance(events[-1].error, NotReady) and "loop failed" in str(events[-1].error)
        assert not eng.serving and failures
        with pytest.raises(NotReady, match="loop failed"):
            eng.submit(request(tokenizer, "hello", n=5), events.append)
    finally:
        eng.shutdown()


def test_prompt_logprobs_through_the_engine_match_score_sums(model: Any, tokenizer: Any) -> None:
    eng = make_engine(model, tokenizer, max_score_tokens=64)
    try:
        prompt = tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
        lps = eng.prompt_logprobs(prompt, top_n=2).result(30)
        assert [lp.token_id for lp in lps] == prompt[1:] and all(len(lp.top) == 2 for lp in lps)
        (total,) = eng.score(prompt[:3], [prompt[3:]]).result(30)
        assert total == pytest.approx(sum(lp.logprob for lp in lps[2:]), abs=1e-4)
        with pytest.raises(InvalidRequest, match="at most 64"):
            eng.prompt_logprobs(prompt * 10)
    finally:
        eng.shutdown()


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")
def test_a_burst_is_prefilled_together_and_a_bad_prompt_fails_alone(
    model: Any, tokenizer: Any, tmp_path: Any
) -> None:
    """Requests admitted together take one batched prefill (llama.cpp); their greedy output
    is what each gives alone, and a prompt the backend refuses fails only its request."""
    tokenizer.save_pretrained(tmp_path)
    backend = llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tmp_path / "tokenizer.json",
        max_slots=4, max_seq_len=64, threads=1, weight_type="f32",
    )  # fmt: skip
    # Without the prefix cache: the prompts run alone first would leave their KV behind.
    config = EngineConfig(max_queue=8, prefix_cache=False)
    eng = Engine(backend, tokenizer, config)  # not started: queue first
    texts = ["the quick brown", "a", "over the lazy dog and"]
    alone = []
    reqs = [request(tokenizer, t, n=8, rid=f"r{i}") for i, t in enumerate(texts)]
    bad = GenerationRequest(
        request_id="bad",
        prompt=Prompt(ids=(1, backend.vocab_size + 5)),
        sampling=SamplingParams(),
        stopping=StopParams(max_new_tokens=4),
    )
    collectors = [Collector() for _ in range(4)]
    for req, c in zip([*reqs[:2], bad, reqs[2]], collectors, strict=True):
        eng.submit(req, c)
    eng.start()
    try:
        got = [c.wait() for c in collectors]
        assert got[2][-1].error is not None and "token ids" in str(got[2][-1].error)
        for req in reqs:
            alone.append(generated_ids(run_one(eng, req)))
        assert [generated_ids(got[i]) for i in (0, 1, 3)] == alone
        # A burst of good prompts: fed together in one step (chunked prefill's forward),
        # the same tokens.
        batches = []
        real = eng.caps.forward
        assert real is not None

        def counted(feeds: list[Feed]) -> torch.Tensor:
            batches.append(sum(len(f.tokens) > 1 for f in feeds))
            return real(feeds)

        eng.caps = dataclasses.replace(eng.caps, forward=counted)
        with eng._cond:  # queue all three before the worker can admit the first
            collectors = [Collector() for _ in reqs]
            for req, c in zip(reqs, collectors, strict=True):
                eng._waiting.append(Sequence(req, c, Handle(eng, req.request_id), tokenizer))
            eng._cond.notify()
        assert [generated_ids(c.wait()) for c in collectors] == alone
        assert batches[0] == 2  # every prompt of more than one token in the first step
        assert eng.stats().free_slots == 4
        assert eng.stats().phase_s["prefill"] > 0
    finally:
        eng.shutdown()
        backend.close()


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")
@pytest.mark.parametrize("drafted", [False, True], ids=["plain", "ngram"])
def test_a_split_cache_keeps_running_slots_packed_and_output_unchanged(
    model: Any, tokenizer: Any, tmp_path: Any, drafted: bool
) -> None:
    """Streams that end out of order free slots below running ones; the engine moves the
    highest stream down, so every step runs slots 0..n-1 (one pass of a split cache), and
    each stream's greedy output is what it gives alone."""
    from slimserve.engine.speculative import NgramDrafter

    tokenizer.save_pretrained(tmp_path)

    def backend(slots: int) -> llamacpp.LlamaCppBackend:
        return llamacpp.LlamaCppBackend(
            model.config, model.state_dict(), tmp_path / "tokenizer.json",
            max_slots=slots, max_seq_len=64, threads=1, weight_type="f32", kv_layout="split",
        )  # fmt: skip

    prompts = ["the quick brown", "café naïve", "hello world, hello", "def main():"]
    lengths = [20, 4, 9, 14]  # slot 1 ends first, then slot 2 (or whoever moved there)
    pairs = enumerate(zip(prompts, lengths, strict=True))
    reqs = [request(tokenizer, p, n, rid=str(i)) for i, (p, n) in pairs]
    alone = make_engine(model, tokenizer, slots=1, backend=backend(1))
    try:
        expected = [generated_ids(run_one(alone, r)) for r in reqs]
    finally:
        alone.shutdown()
    packed = backend(4)
    steps: list[list[int]] = []
    real_extend, real_forward = packed.extend, packed.forward

    def recorded(slots: list[int], tokens: list[Any]) -> Any:
        steps.append(list(slots))
        return real_extend(slots, tokens)

    def recorded_forward(feeds: list[Feed]) -> Any:
        decoding = [f.slot for f in feeds if len(f.tokens) == 1 and packed._lengths[f.slot]]
        if decoding:
            steps.append(decoding)
        return real_forward(feeds)

    if drafted:
        packed.extend = recorded  # type: ignore[method-assign]
    else:
        packed.forward = recorded_forward  # type: ignore[method-assign]
    eng = Engine(
        packed,
        tokenizer,
        EngineConfig(max_queue=8),
        drafter=NgramDrafter() if drafted else None,
        draft=DraftConfig(source="ngram", policy="always"),
    )
    collectors = [Collector() for _ in reqs]
    for r, c in zip(reqs, collectors, strict=True):
        eng.submit(r, c)  # queued before the worker starts: admitted together
    eng.start()
    try:
        got = [generated_ids(c.wait()) for c in collectors]
        stats = eng.stats()
    finally:
        eng.shutdown()
        packed.close()
    assert got == expected
    assert stats.slot_moves >= 1 and stats.phase_s["compact"] > 0
    assert all(sorted(s) == list(range(min(s), min(s) + len(s))) for s in steps), steps
    assert any(len(s) < 4 for s in steps)  # streams did end while others ran
