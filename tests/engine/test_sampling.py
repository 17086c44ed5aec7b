from __future__ import annotations

import torch

from slimserve.engine.sampling import select, token_logprob, warp
from slimserve.engine.types import SamplingParams


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.0])
    assert select(logits, SamplingParams(), None, None) == 1


def test_top_k_and_top_p_mask_the_tail() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    top_k = warp(logits, SamplingParams(do_sample=True, top_k=2))
    assert torch.isinf(top_k[2:]).all() and torch.isfinite(top_k[:2]).all()
    top_p = warp(logits, SamplingParams(do_sample=True, top_p=0.7))
    # 0.5 + 0.3 reaches 0.7: the first two stay, the rest go.
    assert torch.isfinite(top_p[:2]).all() and torch.isinf(top_p[2:]).all()
    tiny_p = warp(logits, SamplingParams(do_sample=True, top_p=0.01))
    assert torch.isfinite(tiny_p).sum() == 1  # always keeps the best token


def test_seeded_sampling_is_reproducible() -> None:
    from slimserve.engine.sampling import make_generator

    logits = torch.randn(100)
    params = SamplingParams(do_sample=True, temperature=1.5, seed=7)
    a = [select(logits, params, g, None) for g in [make_generator(params)] for _ in range(20)]
    g2 = make_generator(params)
    b = [select(logits, params, g2, None) for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([2.0, 1.9, -1.0])
    params = SamplingParams(repetition_penalty=2.0)
    assert select(logits, params, None, torch.tensor([0])) == 1


def test_token_logprob_with_top_n() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0])
    lp = token_logprob(logits, 0, 2)
    assert abs(lp.logprob - float(torch.log_softmax(logits, -1)[0])) < 1e-6
    assert [t for t, _ in lp.top] == [2, 1]
