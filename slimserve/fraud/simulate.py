"""A seeded simulator of card payments with labelled fraud.

The world: customers live in a few European home countries and pay at card-present terminals
near home (each customer has a handful of usual ones) and at online merchants anywhere. Every
customer has their own profile: a log-normal amount distribution (typical amount from about
10 to 90), a daily rate (0.5 to 4 payments), an online share, active hours (a centre hour and
a spread) and a home country. Merchant categories scale amounts (a sofa costs more than a
coffee). Amounts are in the card's billing currency (EUR, or GBP for British cards), as the
issuer books them. All times are UTC; a traveller's local day is shifted by the destination's
offset.

Fraud scenarios (``Scenario``), at least one event of each per simulation; overall about 1%
of payments are fraudulent:

(a) ``amount_spike`` — a stolen card is used at electronics, jewelry, furniture, department or
    clothing merchants for 1–3 payments of 8–40 times the customer's typical amount, online or
    in the home country, at the customer's usual hours.
(b) ``compromised_terminal`` — a card-present terminal near home is compromised for 14–28
    days; in that window each payment there is fraudulent with a terminal-specific probability
    of 0.4–0.9, at ordinary amounts. Only the terminal's fraud history gives it away, and only
    once labels are known (a week later by default): the first week is invisible by design.
(c) ``card_testing`` — 3–8 online payments of 0.10–3.00 at digital-goods, telecom or misc
    merchants a few minutes apart, then 1–3 online payments of 150–2,000 at electronics,
    jewelry or quasi-cash merchants within three hours. Every payment of the burst is fraud.
(d) ``foreign_risky`` — 1–4 payments in a country the customer does not live in, about twelve
    hours away from the customer's usual hours, at wire-transfer (4829), quasi-cash (6051) or
    gambling (7995) merchants, card-present or online.

Legitimate look-alikes, so that no single rule separates the classes:

- travellers (about a third of customers take trips of 2–9 days): card-present payments
  abroad, shifted hours, a large hotel bill, sometimes currency exchange (6051), and a flight
  (4511) booked online beforehand;
- occasional big purchases (5–25 times the typical amount) at the same merchant types as (a);
- night owls (7%) whose usual hours are around midnight to 3 am;
- gamblers (4%) who bet online at night, some with Maltese gambling sites (abroad, 7995);
- micro-payers (6%) with bursts of 2–6 digital purchases of 0.99–4.99;
- remitters (5%) who send a wire transfer (4829) every one to two weeks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Final

import numpy as np

from slimserve.fraud._population import (
    BIG_TICKET,
    CASH_OUT,
    CURRENCIES,
    DAY,
    FRAUD_COUNTRIES,
    HOUR,
    TINY_TEST,
    Customer,
    Event,
    Ints,
    World,
    everyday,
    habits,
    new_customer,
    trip_extras,
    usual_hours,
)
from slimserve.fraud.schema import Transaction, write_transactions

DEFAULT_START: Final = datetime(2026, 1, 1, tzinfo=UTC)

# Fraud events per customer-day; at least one of each per simulation.
_AMOUNT_SPIKE_RATE: Final = 0.0025
_CARD_TESTING_RATE: Final = 0.001
_FOREIGN_RISKY_RATE: Final = 0.002
_COMPROMISE_RATE: Final = 0.0001
_COMPROMISE_DAYS: Final = (14.0, 28.0)  # how long a terminal stays compromised
_COMPROMISE_SHARE: Final = (0.4, 0.9)  # share of its payments that turn fraudulent


class Scenario(StrEnum):
    """The fraud scenario a fraudulent payment belongs to (see the module docstring)."""

    AMOUNT_SPIKE = "amount_spike"
    COMPROMISED_TERMINAL = "compromised_terminal"
    CARD_TESTING = "card_testing"
    FOREIGN_RISKY = "foreign_risky"


@dataclass(frozen=True, slots=True)
class Simulation:
    """Payments sorted by time, and the scenario of every fraudulent one by transaction id."""

    transactions: list[Transaction]
    scenarios: dict[str, Scenario]


def simulate(
    customers: int, days: int, seed: int, start: datetime = DEFAULT_START
) -> list[Transaction]:
    """Simulated payments of ``customers`` over ``days`` from ``start``, sorted by timestamp.

    Raises:
        ValueError: customers or days below 1, or a naive ``start``.
    """
    return run_simulation(customers, days, seed, start).transactions


def run_simulation(
    customers: int, days: int, seed: int, start: datetime = DEFAULT_START
) -> Simulation:
    """Like ``simulate``, also returning the scenario of each fraudulent payment."""
    if customers < 1 or days < 1:
        raise ValueError(f"customers={customers}, days={days}: both must be at least 1")
    if start.tzinfo is None:
        raise ValueError(f"start {start} is naive; pass e.g. datetime(2026, 1, 1, tzinfo=UTC)")
    rng = np.random.default_rng(seed)
    world = World(rng, customers)
    people = [new_customer(rng, world, days) for _ in range(customers)]
    events: list[Event] = []
    for index, person in enumerate(people):
        events.extend(everyday(rng, world, index, person, days))
        events.extend(trip_extras(rng, world, index, person))
        events.extend(habits(rng, world, index, person, days))
    events = _compromise_terminals(rng, world, events, customers, days)
    events.extend(_amount_spikes(rng, world, people, days))
    events.extend(_card_testing(rng, world, people, days))
    events.extend(_foreign_risky(rng, world, people, days))
    horizon = days * DAY
    events = sorted((e for e in events if 0.0 <= e[0] < horizon), key=lambda e: e[:4])
    return _materialise(world, people, events, start)


def write_simulation(
    path: str | Path, customers: int, days: int, seed: int, *, start: datetime = DEFAULT_START
) -> int:
    """Simulate and write a ``.csv`` or ``.jsonl`` file; returns the number of rows."""
    return write_transactions(path, simulate(customers, days, seed, start))


def _compromise_terminals(
    rng: np.random.Generator, world: World, events: list[Event], customers: int, days: int
) -> list[Event]:
    """Scenario (b): label payments at a few home terminals fraudulent for a while."""
    homes = np.concatenate(list(world.home.values()))
    used = np.unique([e[2] for e in events if not world.terminals[e[2]].online])
    used = used[np.isin(used, homes)]
    count = _event_count(customers, days, _COMPROMISE_RATE)
    windows: dict[int, tuple[float, float, float]] = {}
    for terminal in rng.choice(used, size=min(count, used.size), replace=False):
        first = rng.uniform(0, max(days - 14, 1)) * DAY
        last = first + rng.uniform(*_COMPROMISE_DAYS) * DAY
        windows[int(terminal)] = (first, last, rng.uniform(*_COMPROMISE_SHARE))
    marked: list[Event] = []
    for seconds, customer, terminal, amount, scenario in events:
        window = windows.get(terminal)
        hit = window and window[0] <= seconds < window[1] and rng.random() < window[2]
        label = Scenario.COMPROMISED_TERMINAL if hit else scenario
        marked.append((seconds, customer, terminal, amount, label))
    return marked


def _victims(rng: np.random.Generator, people: Sequence[Customer], days: int, rate: float) -> Ints:
    return rng.integers(0, len(people), size=_event_count(len(people), days, rate))


def _event_count(customers: int, days: int, rate: float) -> int:
    # A fixed count rather than a Poisson draw keeps the fraud rate steady across seeds.
    return max(1, round(customers * days * rate))


def _amount_spikes(
    rng: np.random.Generator, world: World, people: Sequence[Customer], days: int
) -> list[Event]:
    """Scenario (a): a few payments far above the victim's typical amount."""
    events: list[Event] = []
    web = world.among(world.online, BIG_TICKET)
    for victim in _victims(rng, people, days, _AMOUNT_SPIKE_RATE):
        c = people[victim]
        near = world.among(world.home[c.home], BIG_TICKET)
        t = rng.integers(0, days) * DAY + usual_hours(rng, c, 1)[0] % 24 * HOUR
        for _ in range(rng.integers(1, 4)):
            pool = near if near.size and rng.random() < 0.4 else web
            amount = math.exp(c.log_typical) * rng.uniform(8, 40)
            events.append((t, int(victim), int(rng.choice(pool)), amount, Scenario.AMOUNT_SPIKE))
            t += rng.uniform(0.2, 3) * HOUR
    return events


def _card_testing(
    rng: np.random.Generator, world: World, people: Sequence[Customer], days: int
) -> list[Event]:
    """Scenario (c): a burst of tiny online payments, then large ones."""
    events: list[Event] = []
    tiny = world.among(world.online, TINY_TEST)
    cash_out = world.among(world.online, CASH_OUT)
    for victim in _victims(rng, people, days, _CARD_TESTING_RATE):
        t = rng.uniform(0, days) * DAY
        for _ in range(rng.integers(3, 9)):
            t += rng.uniform(1, 8) * 60
            amount = rng.uniform(0.1, 3.0)
            events.append((t, int(victim), int(rng.choice(tiny)), amount, Scenario.CARD_TESTING))
        for _ in range(rng.integers(1, 4)):
            t += rng.uniform(0.2, 1.0) * HOUR
            amount = math.exp(rng.uniform(math.log(150), math.log(2000)))
            events.append(
                (t, int(victim), int(rng.choice(cash_out)), amount, Scenario.CARD_TESTING)
            )
    return events


def _foreign_risky(
    rng: np.random.Generator, world: World, people: Sequence[Customer], days: int
) -> list[Event]:
    """Scenario (d): risky categories abroad, about twelve hours off the victim's rhythm."""
    events: list[Event] = []
    for victim in _victims(rng, people, days, _FOREIGN_RISKY_RATE):
        c = people[victim]
        pool = world.risky[rng.integers(0, len(FRAUD_COUNTRIES))]
        hour = c.hour_centre + 12 + rng.normal(0, 2)
        t = rng.integers(0, days) * DAY + hour % 24 * HOUR
        for _ in range(rng.integers(1, 5)):
            amount = math.exp(rng.normal(math.log(300), 0.7))
            events.append((t, int(victim), int(rng.choice(pool)), amount, Scenario.FOREIGN_RISKY))
            t += rng.uniform(0.1, 1.5) * HOUR
    return events


def _materialise(
    world: World, people: Sequence[Customer], events: Sequence[Event], start: datetime
) -> Simulation:
    transactions: list[Transaction] = []
    scenarios: dict[str, Scenario] = {}
    for number, (seconds, customer, terminal, amount, scenario) in enumerate(events):
        where = world.terminals[terminal]
        transaction_id = f"X{number:08d}"
        transactions.append(
            Transaction(
                transaction_id=transaction_id,
                timestamp=start + timedelta(seconds=round(seconds)),
                customer_id=f"C{customer:06d}",
                terminal_id=f"T{terminal:06d}",
                amount=max(0.01, round(amount, 2)),
                currency=CURRENCIES[people[customer].home],
                merchant_category=where.mcc,
                channel="online" if where.online else "card_present",
                country=where.country,
                is_fraud=int(scenario is not None),
            )
        )
        if scenario is not None:
            scenarios[transaction_id] = Scenario(scenario)
    return Simulation(transactions, scenarios)
