"""Speculative decoding on tiny models: backends verify drafts exactly, greedy output with a
draft equals output without one, and the rejection rule samples the target's distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from slimserve.engine.backends import llamacpp
from slimserve.engine.backends.llama import LlamaBackend
from slimserve.engine.config import DraftConfig
from slimserve.engine.scheduler import Engine
from slimserve.engine.spec_policy import EXPLORE_EVERY, DraftPolicy, PassCosts
from slimserve.engine.speculative import (
    DraftRequest,
    ModelDrafter,
    NgramDrafter,
    Proposal,
    accept,
)
from slimserve.engine.types import GenerationRequest, Prompt, SamplingParams, StopParams
from tests.helpers import Collector, tiny_model

VOCAB_PROMPTS = [
    "hello world, hello again; hello world, hello again",
    "the quick brown fox jumps over the lazy dog the quick brown",
    "def main(): return 42  # python code def main():",
    "numbers 0123456789 numbers 0123456789 numbers",
    "café naïve façade",
    "🙂",
]


def _backend(model: Any, slots: int = 4, seq: int = 128) -> LlamaBackend:
    return LlamaBackend.from_model(model, max_slots=slots, max_seq_len=seq, pack_weights=False)


def _cpp(model: Any, tokenizer_dir: Path, slots: int = 4) -> llamacpp.LlamaCppBackend:
    return llamacpp.LlamaCppBackend(
        model.config, model.state_dict(), tokenizer_dir / "tokenizer.json",
        max_slots=slots, max_seq_len=128, threads=1, weight_type="f32",
    )  # fmt: skip


@pytest.fixture(scope="module")
def target(tokenizer: Any) -> Any:
    # Untied: a tiny random model with tied embeddings mostly repeats its input token.
    return tiny_model(len(tokenizer), seed=1, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def draft_model(tokenizer: Any) -> Any:
    # Another model over the same vocabulary: its drafts are often wrong, so rejections,
    # corrections and cache roll-backs all happen.
    return tiny_model(len(tokenizer), seed=7, num_hidden_layers=1, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(out)
    return out


# ---- backends --------------------------------------------------------------------------


def _extend_matches_decode(backend: Any, atol: float) -> None:
    prompt, more = [5, 9, 11, 40], [17, 23, 99, 4, 8]
    backend.prefill(0, prompt)
    stepwise = torch.stack([backend.decode([0], [t])[0].clone() for t in more])  # (5, vocab)
    backend.prefill(1, prompt)
    (block,) = backend.extend([1], [more])
    torch.testing.assert_close(block, stepwise, atol=atol, rtol=0)
    # Keep 2 of the 5, then continue: the same as if the other 3 had never been fed.
    backend.truncate(1, len(prompt) + 2)
    after = backend.decode([1], [77])[0].clone()
    backend.prefill(2, prompt + more[:2])
    torch.testing.assert_close(after, backend.decode([2], [77])[0], atol=atol, rtol=0)
    # Two slots of different lengths in one call.
    outs = backend.extend([0, 2], [[3], [6, 7]])
    assert [o.shape[0] for o in outs] == [1, 2]
    with pytest.raises(ValueError, match="cannot keep"):
        backend.truncate(0, 0)
    with pytest.raises(ValueError, match="free"):
        backend.extend([3], [[1]])
    for s in range(3):
        backend.release(s)


def test_torch_backend_extend_and_truncate_match_stepwise_decode(target: Any) -> None:
    _extend_matches_decode(_backend(target), atol=1e-4)


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")
def test_llamacpp_backend_extend_and_truncate_match_stepwise_decode(
    target: Any, tokenizer_dir: Path
) -> None:
    _extend_matches_decode(_cpp(target, tokenizer_dir), atol=2e-4)


# ---- drafters --------------------------------------------------------------------------


def test_ngram_drafter_proposes_what_followed_the_latest_match() -> None:
    d = NgramDrafter(max_n=3)
    ctx = [1, 2, 3, 4, 5, 9, 2, 3]
    d.begin(0, ctx)
    greedy = SamplingParams()
    (p,) = d.propose([DraftRequest(0, ctx, 3, greedy, None)])
    assert p.tokens == [4, 5, 9]  # "2 3" last occurred at 1..2, followed by 4 5 9
    ctx += [4, 5, 7, 2, 3]  # now "4 5 7 2 3" is the latest occurrence of "2 3"
    (p,) = d.propose([DraftRequest(0, ctx, 2, greedy, None)])
    assert p.tokens == [4, 5]
    (p,) = d.propose([DraftRequest(0, [*ctx, 42], 2, greedy, None)])
    assert p.tokens == []  # 42 never occurred
    d.release(0)


# ---- the engine ------------------------------------------------------------------------


def _generate(engine: Engine, tokenizer: Any, sampling: SamplingParams, n: int = 24) -> list[Any]:
    collectors = []
    for i, prompt in enumerate(VOCAB_PROMPTS):
        c = Collector()
        req = GenerationRequest(
            request_id=str(i),
            prompt=Prompt(ids=tuple(tokenizer(prompt)["input_ids"])),
            sampling=sampling,
            stopping=StopParams(max_new_tokens=n, ignore_eos=True),
        )
        engine.submit(req, c)
        collectors.append(c)
    return [c.wait() for c in collectors]


def _ids(events: list[Any]) -> list[int]:
    assert all(ev.error is None for ev in events), [ev.error for ev in events]
    return [t for ev in events for t in ev.token_ids]


def _run(
    backend: Any,
    tokenizer: Any,
    drafter: Any,
    sampling: SamplingParams,
    k: int = 4,
    *,
    policy: DraftPolicy | None = None,
) -> Any:
    mode = "always" if policy is None else "adaptive"
    draft = DraftConfig(source="ngram", tokens=k, policy=mode)
    engine = Engine(backend, tokenizer, drafter=drafter, draft=draft, policy=policy)
    engine.start()
    try:
        return _generate(engine, tokenizer, sampling), engine.stats()
    finally:
        engine.shutdown()


def _drafters(draft_model: Any, target: Any) -> dict[str, Any]:
    return {
        "ngram": NgramDrafter(),
        "other-model": ModelDrafter(_backend(draft_model), "other"),
        "same-model": ModelDrafter(_backend(target), "same"),
    }


@pytest.mark.parametrize("kind", ["ngram", "other-model", "same-model"])
def test_greedy_output_with_a_draft_equals_output_without(
    kind: str, target: Any, draft_model: Any, tokenizer: Any
) -> None:
    plain, _ = _run(_backend(target), tokenizer, None, SamplingParams())
    drafter = _drafters(draft_model, target)[kind]
    spec, stats = _run(_backend(target), tokenizer, drafter, SamplingParams())
    assert [_ids(s) for s in spec] == [_ids(p) for p in plain]
    assert ["".join(e.text for e in s) for s in spec] == ["".join(e.text for e in p) for p in plain]
    timings = [s[-1].finish.timings for s in spec]
    assert all(t.draft == drafter.name for t in timings)
    assert stats.draft_proposed == sum(t.draft_proposed for t in timings) > 0
    if kind == "same-model":  # a draft that is the target itself is always right
        assert stats.draft_accepted == stats.draft_proposed
    elif kind == "other-model":  # another model's drafts are often wrong: rejections
        assert 0 <= stats.draft_accepted < stats.draft_proposed
    # Fewer target passes than tokens: that is the point.
    assert stats.steps < sum(len(_ids(s)) for s in spec)


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")
def test_greedy_output_with_a_draft_equals_output_without_on_llamacpp(
    target: Any, draft_model: Any, tokenizer: Any, tokenizer_dir: Path
) -> None:
    plain, _ = _run(_cpp(target, tokenizer_dir), tokenizer, None, SamplingParams())
    for drafter in (NgramDrafter(), ModelDrafter(_cpp(draft_model, tokenizer_dir), "other")):
        spec, stats = _run(_cpp(target, tokenizer_dir), tokenizer, drafter, SamplingParams())
        assert [_ids(s) for s in spec] == [_ids(p) for p in plain]
        assert stats.draft_proposed > 0


class _Fixed(PassCosts):
    """Pass costs as a machine with this curve would measure them: the engine's own timings
    of this tiny model are not taken (on this CPU, verifying is almost free)."""

    def __init__(self, cost: Any, up_to: int = 64) -> None:
        super().__init__()
        for n in range(1, up_to + 1):
            super().observe(n, cost(n))

    def observe(self, n: int, seconds: float) -> None:
        pass


def _flat(seconds: float) -> PassCosts:
    return _Fixed(lambda n: seconds)


def _steep() -> PassCosts:
    # A pass of n tokens costs n^4 ms: each token more costs more than it could bring.
    return _Fixed(lambda n: 1e-3 * n**4)


def test_adaptive_policy_sits_out_when_verifying_costs_more_than_it_gains(
    target: Any, draft_model: Any, tokenizer: Any
) -> None:
    plain, _ = _run(_backend(target), tokenizer, None, SamplingParams())
    # Prompt lookup proposes for free; the policy verifies none of it and learns from
    # comparing each first guess with the token the target emits.
    policy = DraftPolicy(_steep(), 4, free_proposals=True)
    spec, stats = _run(_backend(target), tokenizer, NgramDrafter(), SamplingParams(), policy=policy)
    assert [_ids(s) for s in spec] == [_ids(p) for p in plain]
    assert stats.draft_proposed == 0 and policy.steps_drafted == 0 and policy.steps_plain > 0
    assert policy.acceptance != 0.5  # the free checks moved it off its prior
    # A model drafter costs a pass per token: it proposes one token only to keep its
    # acceptance measured, every EXPLORE_EVERY idle steps.
    policy = DraftPolicy(_steep(), 4, free_proposals=False)
    drafter = ModelDrafter(_backend(draft_model), "other")
    spec, stats = _run(_backend(target), tokenizer, drafter, SamplingParams(), policy=policy)
    assert [_ids(s) for s in spec] == [_ids(p) for p in plain]
    explored = stats.steps // EXPLORE_EVERY + 1
    assert 0 < policy.steps_drafted <= explored
    assert 0 < stats.draft_proposed <= 4 * explored  # one token for each of <= 4 slots


def test_adaptive_policy_drafts_when_verifying_is_cheap(target: Any, tokenizer: Any) -> None:
    plain, _ = _run(_backend(target), tokenizer, None, SamplingParams())
    policy = DraftPolicy(_flat(1e-9), 4, free_proposals=False)
    # The target drafting for itself: every draft is accepted, so drafting keeps paying.
    drafter = ModelDrafter(_backend(target), "same")
    spec, stats = _run(_backend(target), tokenizer, drafter, SamplingParams(), policy=policy)
    assert [_ids(s) for s in spec] == [_ids(p) for p in plain]
    assert stats.draft_proposed > 0 and stats.draft_accepted == stats.draft_proposed
    assert policy.steps_drafted > 0 and policy.acceptance > 0.9


def test_sampled_requests_run_with_a_draft_and_are_reproducible(
    target: Any, draft_model: Any, tokenizer: Any
) -> None:
    sampling = SamplingParams(do_sample=True, temperature=0.8, top_k=50, seed=3)
    a, _ = _run(_backend(target), tokenizer, ModelDrafter(_backend(draft_model), "d"), sampling)
    b, _ = _run(_backend(target), tokenizer, ModelDrafter(_backend(draft_model), "d"), sampling)
    assert [_ids(x) for x in a] == [_ids(y) for y in b]
    assert all(len(_ids(x)) == 24 for x in a)


def test_a_drafter_that_fails_is_dropped_and_requests_finish(target: Any, tokenizer: Any) -> None:
    class Broken(NgramDrafter):
        def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
            raise RuntimeError("draft backend died")

    plain, _ = _run(_backend(target), tokenizer, None, SamplingParams())
    spec, stats = _run(_backend(target), tokenizer, Broken(), SamplingParams())
    assert [_ids(s) for s in spec] == [_ids(p) for p in plain]
    assert stats.draft_proposed == 0


# ---- the rejection rule ----------------------------------------------------------------


def _empirical_first(
    logits: torch.Tensor, propose: Any, params: SamplingParams, n: int
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(logits.shape[1])
    for _ in range(n):
        counts[accept(logits, propose(gen), params, gen)[0]] += 1
    return counts / n


@pytest.mark.parametrize("drafter", ["deterministic", "sampled"])
def test_rejection_rule_emits_the_targets_distribution(drafter: str) -> None:
    torch.manual_seed(0)
    vocab, k = 6, 2
    logits = torch.randn(k + 1, vocab) * 1.5
    params = SamplingParams(do_sample=True, temperature=1.0)
    p0 = torch.softmax(logits[0], dim=-1)
    # Draft the target's *least* likely token first, so rejections dominate.
    first = int(p0.argmin())
    if drafter == "deterministic":

        def propose(gen: torch.Generator) -> Proposal:
            return Proposal([first, 0])
    else:  # a draft model: x ~ q, and q far from p (it favours p's least likely token)
        q = torch.softmax(torch.randn(k, vocab), dim=-1)
        q[0] = torch.full((vocab,), 0.02)
        q[0, first] = 1 - 0.02 * (vocab - 1)

        def propose(gen: torch.Generator) -> Proposal:
            x = int(torch.multinomial(q[0], 1, generator=gen))
            return Proposal([x, int(torch.multinomial(q[1], 1, generator=gen))], [q[0], q[1]])

    got = _empirical_first(logits, propose, params, n=20000)
    # Total variation against p: sampling error at 20,000 draws is ~0.01.
    assert float((got - p0).abs().sum() / 2) < 0.02
    # The bonus position: after both drafts are accepted, the last token follows p_k.
    sure = torch.full((k + 1, vocab), -30.0)
    sure[0, 2] = sure[1, 3] = 30.0  # the target is certain of both drafts
    sure[2] = logits[2]
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(vocab)
    for _ in range(5000):
        out = accept(sure, Proposal([2, 3]), params, gen)
        assert out[:2] == [2, 3] and len(out) == 3
        counts[out[2]] += 1
    assert float((counts / 5000 - torch.softmax(logits[2], -1)).abs().sum() / 2) < 0.03


def test_greedy_acceptance_keeps_the_agreeing_prefix_and_corrects() -> None:
    logits = torch.full((4, 5), -1.0)
    logits[0, 1] = logits[1, 2] = logits[2, 4] = logits[3, 0] = 1.0
    assert accept(logits, Proposal([1, 2, 3]), SamplingParams(), None) == [1, 2, 4]
    assert accept(logits, Proposal([0, 2, 4]), SamplingParams(), None) == [1]
    assert accept(logits, Proposal([1, 2, 4]), SamplingParams(), None) == [1, 2, 4, 0]
    with pytest.raises(ValueError, match="rows"):
        accept(logits[:2], Proposal([1, 2, 3]), SamplingParams(), None)
