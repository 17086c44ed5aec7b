"""The legitimate side of the simulation: terminals, customers and their everyday payments.

Private to ``simulate``, which documents the world and adds the fraud on top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

DAY: Final = 86_400.0
HOUR: Final = 3_600.0
# Home countries and the share of customers living there.
_HOMES: Final[Mapping[str, float]] = {
    "NL": 0.35, "DE": 0.25, "BE": 0.10, "FR": 0.10, "GB": 0.10, "ES": 0.05, "IT": 0.05,
}  # fmt: skip
# Travel destinations and their UTC offset in hours relative to the home countries.
_DESTINATIONS: Final[Mapping[str, float]] = {
    "ES": 0, "IT": 0, "FR": 0, "PT": -1, "GR": 1, "US": -6, "TH": 6, "TR": 2, "AE": 3, "MA": -1,
}  # fmt: skip
# Where scenario (d) cashes out; overlaps the destinations on purpose.
FRAUD_COUNTRIES: Final = ("TR", "TH", "AE", "US", "NG", "BR", "RO", "PH")
_ONLINE_COUNTRIES: Final[Mapping[str, float]] = {
    "NL": 0.2, "DE": 0.15, "FR": 0.05, "GB": 0.1, "IE": 0.15, "US": 0.2, "CN": 0.05, "MT": 0.1,
}  # fmt: skip
# Billing currency of a card by home country: amounts are what the issuer books, converted.
CURRENCIES: Final[Mapping[str, str]] = {
    "NL": "EUR", "DE": "EUR", "BE": "EUR", "FR": "EUR", "ES": "EUR", "IT": "EUR", "GB": "GBP",
}  # fmt: skip
# Merchant category → amount multiplier of the customer's typical amount.
_SCALE: Final[Mapping[str, float]] = {
    "5411": 1.0, "5812": 1.2, "5814": 0.4, "5541": 1.5, "5912": 0.8, "5311": 2.0, "5651": 2.0,
    "5999": 1.0, "4111": 0.3, "4121": 0.8, "5732": 5.0, "5942": 0.8, "5712": 8.0, "5944": 6.0,
    "5815": 0.3, "4814": 1.2, "4511": 10.0, "7011": 5.0, "4829": 4.0, "6051": 4.0, "7995": 1.5,
}  # fmt: skip
_HOME_MCCS: Final[Mapping[str, float]] = {
    "5411": 0.25, "5812": 0.12, "5814": 0.10, "5541": 0.10, "5912": 0.06, "5311": 0.05,
    "5651": 0.06, "5999": 0.08, "4111": 0.05, "4121": 0.03, "5732": 0.03, "5942": 0.03,
    "5712": 0.01, "5944": 0.01, "4829": 0.01, "6051": 0.005, "7995": 0.005,
}  # fmt: skip
_TRAVEL_MCCS: Final[Mapping[str, float]] = {
    "5812": 0.3, "7011": 0.2, "5411": 0.15, "5814": 0.1, "4121": 0.1, "5999": 0.1, "6051": 0.05,
}  # fmt: skip
_ONLINE_MCCS: Final[Mapping[str, float]] = {
    "5815": 0.2, "5999": 0.2, "5311": 0.1, "5651": 0.1, "5732": 0.08, "4814": 0.07, "4511": 0.05,
    "7011": 0.05, "5942": 0.05, "5944": 0.02, "4829": 0.03, "6051": 0.02, "7995": 0.03,
}  # fmt: skip
BIG_TICKET: Final = ("5732", "5944", "5712", "5311", "5651")
TINY_TEST: Final = ("5815", "4814", "5999")
CASH_OUT: Final = ("5732", "5944", "6051")
_RISKY: Final = ("4829", "6051", "7995")


@dataclass(frozen=True, slots=True)
class Terminal:
    country: str
    mcc: str
    online: bool


@dataclass(frozen=True, slots=True)
class Customer:
    home: str
    log_typical: float  # log of the typical amount
    sigma: float  # spread of log amounts
    rate: float  # payments per day
    online_share: float
    hour_centre: float  # UTC hour
    hour_spread: float  # hours
    usual: Ints  # usual card-present terminals, (k,)
    usual_weights: Floats  # (k,), sums to 1
    shops: Ints  # usual online merchants
    trips: tuple[tuple[int, int, str], ...]  # (first day, days, destination)
    gambler: bool
    micro_payer: bool
    remitter: bool


# (seconds since start, customer index, terminal index, amount, fraud scenario or None)
Event = tuple[float, int, int, float, str | None]


class World:
    """Terminals by country and channel, built once per simulation."""

    def __init__(self, rng: np.random.Generator, customers: int) -> None:
        self.terminals: list[Terminal] = []
        self.home = {
            country: self._add(rng, max(15, round(customers * share / 4)), {country: 1}, _HOME_MCCS)
            for country, share in _HOMES.items()
        }
        self.travel = {c: self._add(rng, 25, {c: 1}, _TRAVEL_MCCS) for c in _DESTINATIONS}
        online = self._add(rng, max(60, customers // 10), _ONLINE_COUNTRIES, _ONLINE_MCCS, True)
        # One more merchant per category, so that every online category exists in a small world.
        extra = [self._add(rng, 1, _ONLINE_COUNTRIES, {m: 1}, True) for m in _ONLINE_MCCS]
        self.online = np.concatenate([online, *extra])
        start = len(self.terminals)
        self.terminals.extend(
            Terminal(country, mcc, online)
            for country in FRAUD_COUNTRIES
            for mcc in _RISKY
            for online in (False, True)
        )
        self.risky = np.arange(start, len(self.terminals)).reshape(len(FRAUD_COUNTRIES), -1)
        self.mcc = np.array([t.mcc for t in self.terminals])
        self.scale = np.array([_SCALE[t.mcc] for t in self.terminals])

    def _add(
        self,
        rng: np.random.Generator,
        count: int,
        countries: Mapping[str, float],
        mccs: Mapping[str, float],
        online: bool = False,
    ) -> Ints:
        where = _pick_keys(rng, countries, count)
        what = _pick_keys(rng, mccs, count)
        start = len(self.terminals)
        self.terminals.extend(Terminal(c, m, online) for c, m in zip(where, what, strict=True))
        return np.arange(start, len(self.terminals))

    def among(self, pool: Ints, mccs: Sequence[str]) -> Ints:
        """The terminals of ``pool`` in the given categories (may be empty)."""
        return pool[np.isin(self.mcc[pool], mccs)]


def _pick_keys(rng: np.random.Generator, weights: Mapping[str, float], size: int) -> list[str]:
    keys = list(weights)
    p = np.array(list(weights.values()), dtype=float)
    return [keys[i] for i in rng.choice(len(keys), size=size, p=p / p.sum())]


def new_customer(rng: np.random.Generator, world: World, days: int) -> Customer:
    home = _pick_keys(rng, _HOMES, 1)[0]
    night_owl = rng.random() < 0.07
    usual = rng.choice(world.home[home], size=int(rng.integers(3, 9)), replace=False)
    zipf = 1.0 / np.arange(1, usual.size + 1)
    trip_rate = rng.uniform(0.005, 0.03) if rng.random() < 0.35 else 0.0
    trips = tuple(
        (
            int(rng.integers(0, days)),
            int(rng.integers(2, 10)),
            list(_DESTINATIONS)[rng.integers(len(_DESTINATIONS))],
        )
        for _ in range(rng.poisson(trip_rate * days))
    )
    return Customer(
        home=home,
        log_typical=float(rng.normal(3.3, 0.5)),
        sigma=float(rng.uniform(0.4, 0.9)),
        rate=float(rng.uniform(0.5, 4.0)),
        online_share=float(rng.uniform(0.1, 0.5)),
        hour_centre=float(rng.uniform(22.0, 27.0) if night_owl else rng.normal(14.0, 2.0)),
        hour_spread=float(rng.uniform(2.0, 4.0)),
        usual=usual,
        usual_weights=zipf / zipf.sum(),
        shops=rng.choice(world.online, size=int(rng.integers(2, 6)), replace=False),
        trips=trips,
        gambler=bool(rng.random() < 0.04),
        micro_payer=bool(rng.random() < 0.06),
        remitter=bool(rng.random() < 0.05),
    )


def usual_hours(rng: np.random.Generator, c: Customer, size: int) -> Floats:
    return c.hour_centre + c.hour_spread * rng.standard_normal(size)


def everyday(
    rng: np.random.Generator, world: World, index: int, c: Customer, days: int
) -> list[Event]:
    day = np.repeat(np.arange(days), rng.poisson(c.rate, size=days))
    n = day.size
    hour = usual_hours(rng, c, n)
    online = rng.random(n) < c.online_share
    near = np.where(
        rng.random(n) < 0.9,
        rng.choice(c.usual, size=n, p=c.usual_weights),
        rng.choice(world.home[c.home], size=n),
    )
    web = np.where(
        rng.random(n) < 0.85, rng.choice(c.shops, size=n), rng.choice(world.online, size=n)
    )
    terminal = np.where(online, web, near)
    for first, length, destination in c.trips:
        away = ~online & (day >= first) & (day < first + length)
        terminal[away] = rng.choice(world.travel[destination], size=int(away.sum()))
        hour[away] -= _DESTINATIONS[destination]  # local hours → UTC
    amount = np.exp(c.log_typical + c.sigma * rng.standard_normal(n)) * world.scale[terminal]
    seconds = day * DAY + (hour % 24.0) * HOUR
    return [
        (float(t), index, int(k), float(a), None)
        for t, k, a in zip(seconds, terminal, amount, strict=True)
    ]


def trip_extras(rng: np.random.Generator, world: World, index: int, c: Customer) -> list[Event]:
    """A flight booked online beforehand, the hotel bill, sometimes currency exchange."""
    events: list[Event] = []
    typical = math.exp(c.log_typical)
    flights = world.among(world.online, ["4511"])
    for first, length, destination in c.trips:
        pool = world.travel[destination]
        booked = (first - rng.uniform(3, 40)) * DAY + usual_hours(rng, c, 1)[0] % 24 * HOUR
        events.append((booked, index, int(rng.choice(flights)), typical * rng.uniform(6, 25), None))
        hotels = world.among(pool, ["7011"])
        checkout = (first + length - 1) * DAY + rng.uniform(7, 11) * HOUR
        hotel = int(rng.choice(hotels if hotels.size else pool))
        events.append((checkout, index, hotel, length * math.exp(rng.uniform(4.1, 5.3)), None))
        exchange = world.among(pool, ["6051"])
        if exchange.size and rng.random() < 0.3:
            arrival = first * DAY + rng.uniform(0, 24) * HOUR
            events.append((arrival, index, int(rng.choice(exchange)), rng.uniform(50, 500), None))
    return events


def habits(
    rng: np.random.Generator, world: World, index: int, c: Customer, days: int
) -> list[Event]:
    """Big purchases for everyone; gambling, micro-payments and remittances for some."""
    events: list[Event] = []
    typical = math.exp(c.log_typical)

    def at(day: float, hour: float, pool: Ints, amount: float) -> None:
        events.append((day * DAY + hour % 24 * HOUR, index, int(rng.choice(pool)), amount, None))

    big_near = world.among(world.home[c.home], BIG_TICKET)
    big_web = world.among(world.online, BIG_TICKET)
    for _ in range(rng.poisson(0.006 * days)):
        pool = big_near if big_near.size and rng.random() < 0.5 else big_web
        at(
            int(rng.integers(0, days)),
            usual_hours(rng, c, 1)[0],
            pool,
            typical * rng.uniform(5, 25),
        )
    if c.gambler:
        casinos = world.among(world.online, ["7995"])
        for _ in range(rng.poisson(0.5 * days)):
            at(
                int(rng.integers(0, days)),
                rng.normal(23, 2),
                casinos,
                math.exp(rng.normal(3.4, 0.8)),
            )
    if c.micro_payer:
        games = world.among(world.online, ["5815"])
        for _ in range(rng.poisson(0.3 * days)):
            day, hour = int(rng.integers(0, days)), float(usual_hours(rng, c, 1)[0])
            for _ in range(rng.integers(2, 7)):
                hour += rng.uniform(1, 10) / 60
                at(day, hour, games, float(rng.choice([0.99, 1.99, 2.99, 4.99])))
    if c.remitter:
        wires = np.concatenate(
            [world.among(world.online, ["4829"]), world.among(world.home[c.home], ["4829"])]
        )
        sent = rng.uniform(0, 10)
        while sent < days:
            at(int(sent), usual_hours(rng, c, 1)[0], wires, typical * rng.uniform(3, 15))
            sent += rng.uniform(7, 15)
    return events
