from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from slimserve.fraud import (
    Scenario,
    Simulation,
    read_transactions,
    run_simulation,
    simulate,
    write_simulation,
)
from slimserve.fraud.schema import RISKY_MERCHANT_CATEGORIES

from .conftest import SMALL


def _home(sim: Simulation) -> dict[str, str]:
    countries: dict[str, Counter[str]] = {}
    for tx in sim.transactions:
        countries.setdefault(tx.customer_id, Counter())[tx.country] += 1
    return {c: counts.most_common(1)[0][0] for c, counts in countries.items()}


def test_fraud_rate_is_realistic(small: Simulation, train: Simulation) -> None:
    for sim in (small, train):
        rate = sum(tx.is_fraud or 0 for tx in sim.transactions) / len(sim.transactions)
        print(f"{len(sim.transactions)} payments, fraud rate {rate:.3%}")
        assert 0.004 <= rate <= 0.02


def test_every_scenario_occurs_and_labels_match(small: Simulation) -> None:
    fraud_ids = {tx.transaction_id for tx in small.transactions if tx.is_fraud == 1}

    assert set(small.scenarios) == fraud_ids
    assert set(small.scenarios.values()) == set(Scenario)


def test_scenarios_look_as_documented(train: Simulation) -> None:
    home = _home(train)
    by_scenario: dict[Scenario, list[str]] = {}
    rows = {tx.transaction_id: tx for tx in train.transactions}
    for transaction_id, scenario in train.scenarios.items():
        by_scenario.setdefault(scenario, []).append(transaction_id)

    foreign = [rows[i] for i in by_scenario[Scenario.FOREIGN_RISKY]]
    assert all(tx.merchant_category in RISKY_MERCHANT_CATEGORIES for tx in foreign)
    assert all(tx.country != home[tx.customer_id] for tx in foreign)
    testing = [rows[i] for i in by_scenario[Scenario.CARD_TESTING]]
    assert all(tx.channel == "online" for tx in testing)
    assert sum(tx.amount <= 3.0 for tx in testing) > len(testing) / 2
    assert max(tx.amount for tx in testing) >= 150
    compromised = Counter(rows[i].terminal_id for i in by_scenario[Scenario.COMPROMISED_TERMINAL])
    assert max(compromised.values()) >= 5  # a terminal turns, not single payments


def test_legitimate_look_alikes_exist(train: Simulation) -> None:
    home = _home(train)
    legit = [tx for tx in train.transactions if tx.is_fraud == 0]

    assert any(tx.merchant_category in RISKY_MERCHANT_CATEGORIES for tx in legit)
    assert any(tx.country != home[tx.customer_id] and tx.channel == "card_present" for tx in legit)
    assert any(tx.channel == "online" and tx.amount <= 3.0 for tx in legit)
    assert any(tx.timestamp.hour in (1, 2, 3) for tx in legit)
    assert any(tx.amount >= 1000 for tx in legit)


def test_rows_are_sorted_with_unique_ids(small: Simulation) -> None:
    stamps = [tx.timestamp for tx in small.transactions]

    assert stamps == sorted(stamps)
    assert len({tx.transaction_id for tx in small.transactions}) == len(stamps)


def test_the_same_seed_gives_the_same_payments(small: Simulation) -> None:
    assert run_simulation(*SMALL) == small


def test_a_different_seed_gives_different_payments(small: Simulation) -> None:
    customers, days, seed = SMALL
    other = simulate(customers, days, seed=seed + 1)

    assert other != small.transactions


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        simulate(0, 10, seed=1)
    with pytest.raises(ValueError, match="naive"):
        simulate(10, 10, seed=1, start=datetime(2026, 1, 1))  # naive on purpose


def test_write_simulation_writes_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "payments.jsonl"

    count = write_simulation(path, customers=20, days=5, seed=3)
    result = read_transactions(path)

    assert result.errors == []
    assert len(result.rows) == count > 0
    assert result.rows == simulate(20, 5, seed=3)
