"""The draft policy's arithmetic: pass costs, expected tokens, and the cap it chooses on
curves measured on real machines."""

from __future__ import annotations

import random

import pytest

from slimserve.engine.spec_policy import (
    EXPLORE_EVERY,
    Acceptance,
    DraftPolicy,
    PassCosts,
    break_even,
    expected_tokens,
    probe,
    probe_sizes,
)

#: llama.cpp q8_0, SmolLM2-135M, 2 threads of an AMD EPYC (Zen 5): ms per pass of n tokens
#: (one sequence). The one-token pass has its own kernel; two cost 2.5 times as much.
ZEN5_Q8 = {1: 5.74, 2: 14.1, 3: 15.0, 4: 19.3, 5: 21.8, 8: 23.8, 16: 30.5, 32: 72.3}


def _costs(table: dict[int, float]) -> PassCosts:
    costs = PassCosts()
    for n, ms in table.items():
        costs.observe(n, ms / 1e3)
    return costs


def test_pass_costs_interpolate_extrapolate_and_follow_new_timings() -> None:
    costs = _costs({2: 10.0, 4: 14.0})
    assert costs.cost(3) == pytest.approx(0.012)
    assert costs.cost(1) == pytest.approx(0.005)  # below the smallest: proportional
    assert costs.cost(6) == pytest.approx(0.018)  # the last segment's slope
    costs.observe(2, 0.020)  # a moving average, not the newest alone
    assert 0.010 < costs.cost(2) < 0.020
    assert PassCosts().cost(3) == 3.0
    assert costs.describe() == "2:12.0 4:14.0 ms"


def test_expected_tokens_is_the_mean_of_a_simulated_verify() -> None:
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    rng = random.Random(0)
    alpha, k, runs = 0.6, 4, 20000
    total = 0
    for _ in range(runs):
        kept = 0
        while kept < k and rng.random() < alpha:
            kept += 1
        total += kept + 1  # the target's own token after the accepted drafts
    assert total / runs == pytest.approx(expected_tokens(alpha, k), rel=0.02)


def test_on_a_cpu_whose_multi_token_pass_costs_more_drafts_must_be_near_certain() -> None:
    free = DraftPolicy(_costs(ZEN5_Q8), 4, free_proposals=True)
    # One stream: two tokens cost 2.5 plain steps, so even 4 of 5 accepted does not pay...
    assert free.choose([4], [0.8]) == 0
    # ... but a long, near-certain copy (prompt lookup on repeated text) does.
    assert free.choose([4], [0.99]) == 4
    # A model drafter also pays for its own passes.
    model = DraftPolicy(_costs(ZEN5_Q8), 4, free_proposals=False)
    model.observe_draft(0.004, 1)
    assert model.choose([4], [0.99]) == 0


def test_where_verifying_is_almost_free_the_policy_drafts_at_modest_acceptance() -> None:
    # A GPU-like curve: five tokens cost little more than one.
    gpu = DraftPolicy(_costs({1: 8.0, 2: 8.2, 5: 8.6, 16: 9.0, 80: 14.0}), 4, False)
    gpu.observe_draft(0.0008, 1)
    assert gpu.choose([4], [0.6]) == 3  # the fourth draft's 0.13 tokens cost more than 0.8 ms
    assert gpu.choose([4], [0.8]) == 4
    assert gpu.choose([2], [0.8]) == 2  # never more than a sequence's room
    assert gpu.choose([0, 0], [0.6, 0.6]) == 0


def test_acceptance_is_learned_per_sequence_over_an_engine_wide_prior() -> None:
    policy = DraftPolicy(_costs(ZEN5_Q8), 4, free_proposals=True)
    good, bad, fresh = Acceptance(), Acceptance(), Acceptance()
    for _ in range(10):
        policy.record(good, 4, 4)  # all four kept: no failure counted
        policy.record(bad, 4, 0)
    assert policy.alpha(good) > 0.85 and policy.alpha(bad) < 0.3
    assert 0.3 < policy.alpha(fresh) < 0.9  # the prior: between the two
    bad.guess = 7
    policy.check(bad, 7)  # a sat-out step's first guess, right
    assert bad.guess is None and bad.hits == 1


def test_a_model_drafter_sitting_out_proposes_one_token_now_and_then() -> None:
    policy = DraftPolicy(_costs(ZEN5_Q8), 4, free_proposals=False)
    picks = [policy.choose([4], [0.1]) for _ in range(3 * EXPLORE_EVERY)]
    assert picks.count(1) == 3 and set(picks) == {0, 1}
    assert policy.steps_drafted == 3 and policy.steps_plain == 3 * EXPLORE_EVERY - 3


def test_probe_times_each_size_and_sizes_fit_a_slot() -> None:
    seen: list[int] = []
    costs = probe(seen.append, lambda: None, [1, 2, 5])
    assert seen == [1, 1, 2, 2, 5, 5] and sorted(costs.table()) == [1, 2, 5]
    assert probe_sizes(4, 16, 4096) == [1, 2, 3, 4, 5, 10, 16, 80]
    assert probe_sizes(4, 16, 32) == [1, 2, 3, 4, 5, 10, 16]


def test_break_even_acceptance_on_measured_curves() -> None:
    zen5 = _costs(ZEN5_Q8)
    # Two tokens cost 2.5 plain steps: not even a certain draft of one pays.
    assert break_even(zen5, 1) == 1.0
    k4 = break_even(zen5, 4)  # five tokens for 3.8 plain steps: nearly certain drafts
    assert 0.85 < k4 < 0.9
    assert expected_tokens(k4, 4) * ZEN5_Q8[1] == pytest.approx(ZEN5_Q8[5], rel=1e-6)
    flat = _costs({1: 8.0, 5: 8.0})
    assert break_even(flat, 4) == pytest.approx(0.0, abs=1e-6)  # free verify: anything pays


def test_a_step_that_takes_several_passes_costs_them_all() -> None:
    def two_runs(counts: list[int]) -> list[int]:  # one pass per distinct count, say
        return [counts.count(c) * c for c in sorted(set(counts))]

    one = DraftPolicy(_costs(ZEN5_Q8), 4, free_proposals=True)
    many = DraftPolicy(_costs(ZEN5_Q8), 4, free_proposals=True, passes=two_runs)
    assert one.step_cost([2, 2]) == pytest.approx(ZEN5_Q8[4] / 1e3)
    assert many.step_cost([1, 5]) == pytest.approx((ZEN5_Q8[1] + ZEN5_Q8[5]) / 1e3)
    many.observe_step([1, 5], 1.0)  # two passes: not one pass's cost
    assert many.costs.cost(6) == one.costs.cost(6)
    many.observe_step([3, 3], 0.050)  # one pass of 6
    assert many.costs.table()[6] == 0.050
