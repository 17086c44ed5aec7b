"""Prefix reuse: a new request starts from the KV a finished or running one left, and its
greedy output is token-identical to a run without reuse (torch and llama.cpp caches)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from slimserve.engine.backends import llamacpp
from slimserve.engine.backends.llama import LlamaBackend
from slimserve.engine.config import EngineConfig
from slimserve.engine.prefix import PrefixCache, common_prefix
from slimserve.engine.scheduler import Engine
from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams
from tests.helpers import Collector, tiny_model

SEQ_LEN = 160


def ids(seed: int, n: int, vocab: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def req(prompt: list[int], n: int = 10, rid: str = "r") -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt=Prompt(ids=tuple(prompt)),
        sampling=SamplingParams(),
        stopping=StopParams(max_new_tokens=n, ignore_eos=True),
    )


def generate(engine: Engine, r: GenerationRequest) -> tuple[list[int], int]:
    """(generated ids, cached prompt tokens) of one request run to its end."""
    c = Collector()
    engine.submit(r, c)
    events = c.wait()
    assert events[-1].error is None, events[-1].error
    finish = events[-1].finish
    return [t for e in events for t in e.token_ids], finish.cached_tokens


# ---- placement, without a model -------------------------------------------------------------
def test_common_prefix() -> None:
    a = np.array([1, 2, 3, 4])
    assert common_prefix(a, np.array([1, 2, 9])) == 2
    assert common_prefix(a, np.array([1, 2, 3, 4, 5])) == 4
    assert common_prefix(a, np.array([], dtype=np.int64)) == 0
    assert common_prefix(a, np.array([7])) == 0


def test_placement_prefers_the_longest_residue_then_a_donor_then_a_spare_slot() -> None:
    cache = PrefixCache(min_tokens=4)
    cache.keep(2, list(range(10, 30)))  # 20 tokens
    cache.keep(3, list(range(10, 20)) + [99] * 10)
    prompt = np.array([*range(10, 25), 7, 7], dtype=np.int64)
    p = cache.place(prompt, [2, 3])
    assert (p.slot, p.source, p.length) == (2, 2, 15)  # reused in place, no copy
    # With a slot to spare, a residue longer than the match is copied from, not cut back.
    p = cache.place(prompt, [0, 2, 3])
    assert (p.slot, p.source, p.length) == (0, 2, 15)
    # A running donor with a longer match is copied into a spare slot (one without residue).
    donor = np.array([*range(10, 25), 7], dtype=np.int64)
    p = cache.place(prompt, [0, 2, 3], [(5, donor)])
    assert (p.slot, p.source, p.length) == (0, 5, 16)
    # At least the prompt's last token is fed, and a tiny match is not worth it.
    p = cache.place(donor, [0], [(5, donor)])
    assert p.length == len(donor) - 1
    p = cache.place(np.array([10, 11, 12, 1, 2]), [0, 2])
    assert (p.slot, p.length) == (0, 0)
    # No spare slot: the least recently used residue gives way.
    cache.keep(0, list(range(50, 60)))
    p = cache.place(np.array([1, 2, 3, 4, 5, 6]), [0, 2, 3])
    assert (p.slot, p.length) == (2, 0)
    assert cache.cells == 50 and cache.evictable(keep=3) == [2, 0]
    assert cache.drop(2) and not cache.drop(2) and cache.cells == 30


# ---- engines ---------------------------------------------------------------------------------
Factory = Callable[[int], Any]


@pytest.fixture(
    params=["torch", "llamacpp-split", "llamacpp-unified"],
)
def backend_factory(
    request: pytest.FixtureRequest, tokenizer: Any, tmp_path: Any
) -> Iterator[Factory]:
    model = tiny_model(len(tokenizer), seed=3)
    made: list[Any] = []

    def make(slots: int, pool_mb: float | None = None) -> Any:
        if request.param == "torch":
            b: Any = LlamaBackend(
                model.config, model.state_dict(), max_slots=slots, max_seq_len=SEQ_LEN
            )
        else:
            if not llamacpp.available():
                pytest.skip("llama-cpp-python not installed")
            tokenizer.save_pretrained(tmp_path)
            layout = request.param.split("-")[1]
            b = llamacpp.LlamaCppBackend(
                model.config, model.state_dict(), tmp_path / "tokenizer.json",
                max_slots=slots, max_seq_len=SEQ_LEN, threads=1, weight_type="f32",
                kv_layout=layout,
                kv_pool_bytes=int(pool_mb * 2**20) if pool_mb else None,
            )  # fmt: skip
        made.append(b)
        return b

    yield make
    for b in made:
        if hasattr(b, "close"):
            b.close()


def engine(backend: Any, tokenizer: Any, prefix: bool = True) -> Engine:
    eng = Engine(backend, tokenizer, EngineConfig(max_queue=16, prefix_cache=prefix))
    eng.start()
    return eng


def test_a_shared_header_and_a_conversation_reuse_the_cache_exactly(
    backend_factory: Factory, tokenizer: Any
) -> None:
    header = ids(1, 60)
    prompts = [header + ids(10 + i, 12) for i in range(3)]
    plain = engine(backend_factory(2), tokenizer, prefix=False)
    try:
        expected = [generate(plain, req(p)) for p in prompts]
        first_answer = expected[0][0]
        turn2 = prompts[0] + first_answer + ids(99, 6)
        expected.append(generate(plain, req(turn2)))
    finally:
        plain.shutdown()
    assert all(cached == 0 for _, cached in expected)
    cached_eng = engine(backend_factory(2), tokenizer)
    try:
        got = [generate(cached_eng, req(p)) for p in [*prompts, turn2]]
        stats = cached_eng.stats()
    finally:
        cached_eng.shutdown()
    assert [g for g, _ in got] == [g for g, _ in expected]
    assert got[0][1] == 0
    assert got[1][1] == got[2][1] == 60  # the header, from the residue of the one before
    # The next turn reuses the first turn's prompt and answer (all but its last token,
    # which was never fed): its residue, copied from rather than cut back when the
    # second prompt took the header.
    assert got[3][1] == len(prompts[0]) + len(first_answer) - 1
    assert stats.prefix_hits == 3 and stats.cached_tokens == 120 + got[3][1]
    assert stats.prompt_tokens == sum(len(p) for p in [*prompts, turn2])


def test_a_running_request_lends_its_prompt_and_output_is_unchanged(
    backend_factory: Factory, tokenizer: Any
) -> None:
    """Requests arriving while one with the same header runs copy its prompt's KV into
    their own slots (llama.cpp: shared cells or a stream copy; torch: rows)."""
    header = ids(2, 70)
    first = req(header + ids(20, 5), n=40, rid="long")
    others = [req(header + ids(30 + i, 8), n=6, rid=f"o{i}") for i in range(2)]
    plain = engine(backend_factory(3), tokenizer, prefix=False)
    try:
        expected = [generate(plain, r)[0] for r in [first, *others]]
    finally:
        plain.shutdown()
    eng = engine(backend_factory(3), tokenizer)
    try:
        c = Collector()
        eng.submit(first, c)
        got_first = c.events.get(timeout=60)  # accepted or first tokens: it is running
        del got_first
        got = [generate(eng, r) for r in others]
        rest = c.wait()
    finally:
        eng.shutdown()
    long_ids = [t for e in rest for t in e.token_ids]
    assert [g for g, _ in got] == expected[1:]
    assert all(cached >= 70 for _, cached in got), got
    assert len(long_ids) <= 40 and expected[0][-len(long_ids) :] == long_ids


def test_a_cancelled_prompt_leaves_only_what_was_fed(
    backend_factory: Factory, tokenizer: Any
) -> None:
    """A request cancelled while its prompt is fed a chunk a step leaves the chunks whose
    pass completed, no more; the next request with that prompt starts from them and
    gives what a run without reuse gives."""
    prompt = ids(4, 150)
    eng = Engine(backend_factory(1), tokenizer, EngineConfig(max_queue=4))
    eng._budget.capacity = 16  # a 16-token chunk a step
    real = eng.caps.forward
    assert real is not None
    passes = []
    c = Collector()

    def counted(feeds: list[Any]) -> Any:
        passes.append(feeds)
        if len(passes) == 3:
            handle.cancel()
        return real(feeds)

    eng.caps = dataclasses.replace(eng.caps, forward=counted)
    handle = eng.submit(req(prompt, n=4), c)
    eng.start()
    try:
        assert c.wait()[-1].finish.reason.value == "CANCELLED"
        assert eng._prefix is not None and eng._prefix.tokens(0) == 48  # 3 chunks fed
        out, cached = generate(eng, req(prompt, n=6))
        assert cached == 48
    finally:
        eng.shutdown()
    plain = engine(backend_factory(1), tokenizer, prefix=False)
    try:
        assert generate(plain, req(prompt, n=6))[0] == out
    finally:
        plain.shutdown()


def test_a_pooled_cache_evicts_residues_to_admit(tokenizer: Any, tmp_path: Any) -> None:
    """A pool that holds two sequences: residues of earlier prompts are evicted, least
    recently used first, so every request is admitted and none finds the cache full."""
    if not llamacpp.available():
        pytest.skip("llama-cpp-python not installed")
    model = tiny_model(len(tokenizer), seed=3)
    tokenizer.save_pretrained(tmp_path)
    per_token = 2 * 2 * 32 * 4  # layers x (K, V) x kv dim x float32
    backend = llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tmp_path / "tokenizer.json",
        max_slots=4, max_seq_len=SEQ_LEN, threads=1, weight_type="f32", kv_layout="unified",
        kv_pool_bytes=2 * SEQ_LEN * per_token,
    )  # fmt: skip
    assert backend.kv_pool_tokens == 2 * SEQ_LEN
    eng = engine(backend, tokenizer)
    try:
        prompts = [ids(40 + i, 100) for i in range(6)]
        for p in prompts:
            generate(eng, req(p, n=8))
        _, cached = generate(eng, req(prompts[-1][:90] + ids(7, 5), n=8))
        assert cached == 90  # the most recent residue survived
        assert eng._prefix is not None and eng._prefix.cells <= backend.kv_pool_tokens
    finally:
        eng.shutdown()
        backend.close()


def test_choices_of_one_prompt_share_one_prefill(backend_factory: Factory, tokenizer: Any) -> None:
    """Three requests with one prompt arriving together (`n` = 3): the first feeds it, the
    others wait for it and copy its KV, so the prompt is prefilled once; every output is
    the one a run without reuse gives."""
    prompt = ids(6, 90)
    plain = engine(backend_factory(1), tokenizer, prefix=False)
    try:
        expected = generate(plain, req(prompt, n=8))[0]
    finally:
        plain.shutdown()
    eng = Engine(backend_factory(3), tokenizer, EngineConfig(max_queue=8))
    fed: list[int] = []
    real = eng.caps.forward
    assert real is not None

    def counted(feeds: list[Any]) -> Any:
        fed.append(sum(len(f.tokens) for f in feeds if len(f.tokens) > 1))
        return real(feeds)

    eng.caps = dataclasses.replace(eng.caps, forward=counted)
    collectors = [Collector() for _ in range(3)]
    for i, c in enumerate(collectors):
        eng.submit(req(prompt, n=8, rid=f"c{i}"), c)  # queued before the worker starts
    eng.start()
    try:
        finishes = []
        for c in collectors:
            events = c.wait()
            assert [t for e in events for t in e.token_ids] == expected
            finishes.append(events[-1].finish)
    finally:
        eng.shutdown()
    assert sorted(f.cached_tokens for f in finishes) == [0, 89, 89]
    assert sum(fed) == len(prompt)  # prompt tokens fed in chunks: once
