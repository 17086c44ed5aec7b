from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from slimserve.fraud import (
    FEATURE_NAMES,
    LABEL_FRAUD,
    LABEL_LEGIT,
    LABELS,
    PROMPT_QUESTION,
    FeatureBuilder,
    FeatureConfig,
    Features,
    Simulation,
    Transaction,
    build_features,
    feature_vector,
    render_prompt,
)

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
_ids = iter(range(1_000_000))


def pay(
    at: timedelta,
    *,
    customer: str = "C1",
    terminal: str = "T1",
    amount: float = 20.0,
    country: str = "NL",
    channel: str = "card_present",
    fraud: int | None = 0,
) -> Transaction:
    return Transaction(
        transaction_id=f"X{next(_ids)}",
        timestamp=T0 + at,
        customer_id=customer,
        terminal_id=terminal,
        amount=amount,
        currency="EUR",
        merchant_category="5411",
        channel=channel,  # type: ignore[arg-type]
        country=country,
        is_fraud=fraud,
    )


def last_features(rows: list[Transaction], config: FeatureConfig | None = None) -> Features:
    return build_features(rows, config)[-1]


def test_a_first_payment_has_no_history() -> None:
    f = last_features([pay(timedelta(0))])

    assert f.customer_history == 0
    assert (f.count_1h, f.count_24h, f.count_7d) == (0, 0, 0)
    assert f.hours_since_last is None
    assert f.home_country is None
    assert not f.foreign
    assert f.amount_ratio == 1.0
    assert f.terminal_labelled == 0


def test_counts_averages_and_gaps_use_earlier_payments_only() -> None:
    rows = [
        pay(timedelta(days=-8), amount=1000.0),  # outside 7 days, still in the average
        pay(timedelta(days=-3), amount=10.0),
        pay(timedelta(hours=-5), amount=30.0),
        pay(timedelta(minutes=-30), amount=40.0),
        pay(timedelta(0), amount=108.0),
    ]
    f = last_features(rows)

    assert (f.count_1h, f.count_24h, f.count_7d) == (1, 2, 3)
    assert f.customer_history == 4
    assert f.avg_amount == pytest.approx(270.0)
    assert f.amount_ratio == pytest.approx(108.0 / 270.0)
    assert f.hours_since_last == pytest.approx(0.5)
    assert f.hour == 12


def test_home_is_the_most_frequent_country_so_far() -> None:
    rows = [
        pay(timedelta(hours=-4), country="DE"),
        pay(timedelta(hours=-3), country="NL"),
        pay(timedelta(hours=-2), country="NL"),
        pay(timedelta(0), country="DE"),
    ]
    f = last_features(rows)

    assert f.home_country == "NL"
    assert f.foreign


def test_tiny_online_payments_are_counted_over_the_last_hour() -> None:
    rows = [
        pay(timedelta(minutes=-90), amount=1.0, channel="online"),  # too old
        pay(timedelta(minutes=-20), amount=0.5, channel="online"),
        pay(timedelta(minutes=-10), amount=2.0, channel="online"),
        pay(timedelta(minutes=-5), amount=2.0),  # in person
        pay(timedelta(minutes=-4), amount=60.0, channel="online"),  # not tiny
        pay(timedelta(0), amount=900.0, channel="online"),
    ]
    f = last_features(rows)

    assert f.tiny_online_1h == 2
    assert not f.tiny_online


def test_a_terminal_label_counts_only_after_the_delay() -> None:
    fraud = pay(timedelta(0), customer="victim", fraud=1)

    def rate_at(later: timedelta) -> tuple[float, int]:
        f = last_features([fraud, pay(later, customer="other")])
        return f.terminal_fraud_rate, f.terminal_labelled

    assert rate_at(timedelta(days=7) - timedelta(seconds=1)) == (0.0, 0)
    assert rate_at(timedelta(days=7)) == (1.0, 1)
    assert rate_at(timedelta(days=7 + 28) - timedelta(seconds=1)) == (1.0, 1)
    assert rate_at(timedelta(days=7 + 28)) == (0.0, 0)  # left the window
    short = FeatureConfig(label_delay=timedelta(hours=1))
    assert last_features([fraud, pay(timedelta(hours=1), customer="o")], short).terminal_labelled


def test_unlabelled_payments_never_count_for_the_terminal() -> None:
    rows = [pay(timedelta(0), fraud=None), pay(timedelta(days=1)), pay(timedelta(days=9))]
    f = last_features(rows)

    assert (f.terminal_fraud_rate, f.terminal_labelled) == (0.0, 1)


def test_a_payment_label_never_reaches_its_own_features() -> None:
    history = [pay(timedelta(days=-10), fraud=1), pay(timedelta(days=-1))]
    now = pay(timedelta(0))

    assert last_features([*history, now]) == last_features([*history, replace(now, is_fraud=1)])


def test_features_do_not_look_ahead(small: Simulation) -> None:
    rows = small.transactions
    cut = len(rows) // 2
    full = build_features(rows)
    # Every later payment changed: amounts, places, channels and labels.
    altered = [
        replace(
            tx,
            amount=tx.amount * 7 + 1,
            country="BR",
            channel="online",
            is_fraud=1 - (tx.is_fraud or 0),
        )
        for tx in rows[cut:]
    ]

    assert build_features(rows[:cut]) == full[:cut]
    assert build_features(rows[:cut] + altered)[:cut] == full[:cut]


def test_out_of_order_payments_are_refused() -> None:
    builder = FeatureBuilder()
    builder.observe(pay(timedelta(hours=1)))

    with pytest.raises(ValueError, match="sort the stream"):
        builder.features_for(pay(timedelta(0)))


def test_feature_config_is_validated() -> None:
    with pytest.raises(ValueError, match="label_delay"):
        FeatureConfig(label_delay=timedelta(days=-1))
    with pytest.raises(ValueError, match="terminal_window"):
        FeatureConfig(terminal_window=timedelta(0))
    with pytest.raises(ValueError, match="tiny_amount"):
        FeatureConfig(tiny_amount=0.0)


def test_feature_vectors_are_finite_and_named(small: Simulation) -> None:
    vectors = [feature_vector(f) for f in build_features(small.transactions[:3000])]

    assert all(len(v) == len(FEATURE_NAMES) for v in vectors)
    assert all(math.isfinite(x) for v in vectors for x in v)


def test_prompts_are_short_deterministic_and_end_in_the_question(small: Simulation) -> None:
    rows = small.transactions[:2000]
    prompts = [render_prompt(tx, f) for tx, f in zip(rows, build_features(rows), strict=True)]

    assert prompts == [
        render_prompt(tx, f) for tx, f in zip(rows, build_features(rows), strict=True)
    ]
    assert all(p.endswith(PROMPT_QUESTION) for p in prompts)
    # ~45 SmolLM2 tokens at the median; words are a tokenizer-free proxy.
    assert max(len(p.split()) for p in prompts) <= 32
    assert LABELS == (LABEL_LEGIT, LABEL_FRAUD) == (" no", " yes")


def test_a_prompt_states_the_facts() -> None:
    rows = [
        pay(timedelta(hours=-30), country="NL"),
        pay(timedelta(hours=-2), amount=10.0, country="NL"),
        replace(pay(timedelta(0), amount=450.0, country="NG"), merchant_category="6051"),
    ]
    prompt = render_prompt(rows[-1], last_features(rows))
    print(prompt)

    assert prompt == (
        "new terminal; 450 30x very high, 0/1h 1/day, last 2h; "
        "in person quasi-cash risky, abroad NG, usual hour; fraud?"
    )
    huge = replace(rows[-1], amount=4500.0)
    assert "4500 300x very high" in render_prompt(huge, last_features([*rows[:-1], huge]))
    small = replace(rows[-1], amount=2.5, country="NL", merchant_category="5411")
    assert "2.5 0.2x low" in render_prompt(small, last_features([*rows[:-1], small]))
    first = render_prompt(rows[0], last_features(rows[:1]))
    assert first == "new terminal; 20, first; in person grocery, NL; fraud?"


def test_a_prompt_names_a_tiny_burst_and_a_known_bad_terminal() -> None:
    # Labels count a week after their payment: the two frauds 8 days ago are known.
    history = [
        pay(timedelta(days=-8, hours=h), customer=f"O{h}", terminal="T9", fraud=int(h < 2))
        for h in range(4)
    ]
    burst = [
        pay(timedelta(minutes=m), amount=0.5, channel="online", terminal=f"W{m}")
        for m in range(0, 15, 5)
    ]
    rows = [*history, pay(timedelta(hours=-5)), *burst, pay(timedelta(minutes=20), terminal="T9")]
    prompt = render_prompt(rows[-1], last_features(rows))
    print(prompt)

    assert prompt.startswith("terminal 50% high; ")
    assert "20 3.7x high, 3/1h 4/day, last 10m; tiny 3/1h burst; in person" in prompt
    one = render_prompt(burst[1], last_features(rows[: len(history) + 3]))
    assert "tiny 1/1h;" in one and "burst" not in one
