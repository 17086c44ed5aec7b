"""Streaming features for one payment, computed only from the payments before it.

A ``FeatureBuilder`` is fed the stream in order: ``features_for(tx)`` describes ``tx`` from
the payments already passed to ``observe``, then ``observe(tx)`` adds it. Nothing later in
the stream, and nothing about ``tx`` but its own fields, can reach its features (its label
never does). Timestamps must not decrease.

Fraud labels are not known when a payment happens: a label counts only once
``label_delay`` (7 days by default: chargebacks and customer reports take days) has passed
since its payment. The terminal's fraud rate is taken over payments at the terminal made
within ``terminal_window`` (28 days) before that cut-off, i.e. in
``(now - delay - window, now - delay]``. Unlabelled payments (``is_fraud`` None) never count.

The customer's home country is the most frequent country among their earlier payments (on a
tie, the one that reached the count first). Hours are the timestamp's UTC hour.

``render_prompt`` writes the same facts as a short English prompt for the language model,
ending in ``PROMPT_QUESTION``; the model's answer is one of ``LABEL_FRAUD`` / ``LABEL_LEGIT``.
``feature_vector`` turns them into numbers for the classical baseline (``FEATURE_NAMES``).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

from slimserve.fraud.schema import (
    MERCHANT_CATEGORIES,
    RISKY_MERCHANT_CATEGORIES,
    Channel,
    Transaction,
)

LABEL_FRAUD: Final = " yes"
LABEL_LEGIT: Final = " no"
# Indexed by ``is_fraud``: LABELS[0] is the legitimate answer.
LABELS: Final = (LABEL_LEGIT, LABEL_FRAUD)
PROMPT_QUESTION: Final = "; fraud?"
# Bumped whenever ``render_prompt`` changes what a model reads. ``fraud train`` records it in
# the version's metrics; the scoring client refuses a model trained on another format.
PROMPT_FORMAT: Final = 3

_HOUR: Final = 3_600.0
_DAY: Final = 86_400.0
# Stand-in for "no earlier payment" in the vector: a month, in hours.
_NO_PREVIOUS_HOURS: Final = 720.0
_HOUR_NEIGHBOURHOOD: Final = 2  # hours either side counted as "near this hour"
# Where the prompt names a level. Set from the scenarios' definitions, not fitted to labels.
_HIGH_RATIO: Final = 3.0
_VERY_HIGH_RATIO: Final = 8.0  # amount_spike draws 8-40x the typical amount
_TINY_BURST: Final = 2  # card testing: 3-8 tiny online payments minutes apart
_ODD_HOUR_SHARE: Final = 0.05
_RARE_HOUR_SHARE: Final = 0.2
_LOW_RATIO: Final = 0.3
_HIGH_TERMINAL_RATE: Final = 0.2


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureConfig:
    """Windows of the streaming features; ``tiny_amount`` is in billing-currency units."""

    label_delay: timedelta = timedelta(days=7)
    terminal_window: timedelta = timedelta(days=28)
    tiny_amount: float = 5.0

    def __post_init__(self) -> None:
        if self.label_delay < timedelta(0):
            raise ValueError(f"label_delay {self.label_delay} is negative; use >= 0")
        if self.terminal_window <= timedelta(0):
            raise ValueError(f"terminal_window {self.terminal_window} must be positive")
        if not self.tiny_amount > 0:
            raise ValueError(f"tiny_amount {self.tiny_amount} must be positive, e.g. 5.0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Features:
    """What is known about a payment when it happens. Counts exclude the payment itself."""

    amount: float
    currency: str
    channel: Channel
    merchant_category: str
    country: str
    hour: int  # UTC, 0-23
    customer_history: int  # all earlier payments of the customer
    count_1h: int
    count_24h: int
    count_7d: int
    avg_amount: float  # mean of all earlier amounts; 0.0 without history
    amount_ratio: float  # amount / avg_amount; 1.0 without history
    amount_zscore: float  # of log(amount) against earlier log amounts; 0.0 below 2 payments
    hours_since_last: float | None  # None for the customer's first payment
    home_country: str | None  # None for the customer's first payment
    foreign: bool  # country differs from a known home country
    hour_share: float | None  # share of earlier payments within ±2 h of this hour
    tiny_online: bool  # this payment is online and at most tiny_amount
    tiny_online_1h: int  # earlier tiny online payments in the last hour
    terminal_fraud_rate: float  # 0.0 without labelled payments
    terminal_labelled: int  # labelled payments behind terminal_fraud_rate


FEATURE_NAMES: Final = (
    "log_amount",
    "online",
    "mcc_code",
    "risky_mcc",
    "mcc_4829",
    "mcc_6051",
    "mcc_7995",
    "hour_sin",
    "hour_cos",
    "hour_share",
    "foreign",
    "log_history",
    "count_1h",
    "count_24h",
    "count_7d",
    "log_avg_amount",
    "log_amount_ratio",
    "amount_zscore",
    "log_hours_since_last",
    "tiny_online",
    "tiny_online_1h",
    "terminal_fraud_rate",
    "log_terminal_labelled",
)


@dataclass(slots=True)
class _Customer:
    recent: deque[float] = field(default_factory=deque)  # timestamps within 7 days
    tiny: deque[float] = field(default_factory=deque)  # tiny online payments within 1 hour
    count: int = 0
    total: float = 0.0
    log_total: float = 0.0
    log_squares: float = 0.0
    last: float | None = None
    countries: Counter[str] = field(default_factory=Counter)
    home: str | None = None
    hours: list[int] = field(default_factory=lambda: [0] * 24)


@dataclass(slots=True)
class _Terminal:
    pending: deque[tuple[float, int]] = field(default_factory=deque)  # label not known yet
    known: deque[tuple[float, int]] = field(default_factory=deque)
    frauds: int = 0  # among known


class FeatureBuilder:
    """Computes ``Features`` over a time-ordered stream; see the module docstring.

    Memory grows with the number of customers and terminals seen, not with stream length.
    """

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = config or FeatureConfig()
        self._delay = self.config.label_delay.total_seconds()
        self._window = self.config.terminal_window.total_seconds()
        self._customers: dict[str, _Customer] = {}
        self._terminals: dict[str, _Terminal] = {}
        self._clock = -math.inf

    def features_for(self, tx: Transaction) -> Features:
        """The features of ``tx`` from the payments observed so far.

        Raises:
            ValueError: ``tx`` is older than a payment already seen.
        """
        now = self._advance(tx)
        customer = self._customers.get(tx.customer_id) or _Customer()
        terminal = self._terminal(tx.terminal_id, now)
        return Features(
            amount=tx.amount,
            currency=tx.currency,
            channel=tx.channel,
            merchant_category=tx.merchant_category,
            country=tx.country,
            hour=tx.timestamp.hour,
            customer_history=customer.count,
            count_1h=sum(1 for t in customer.recent if t > now - _HOUR),
            count_24h=sum(1 for t in customer.recent if t > now - _DAY),
            count_7d=len(customer.recent),
            avg_amount=customer.total / customer.count if customer.count else 0.0,
            amount_ratio=tx.amount * customer.count / customer.total if customer.total else 1.0,
            amount_zscore=_zscore(customer, tx.amount),
            hours_since_last=None if customer.last is None else (now - customer.last) / _HOUR,
            home_country=customer.home,
            foreign=customer.home is not None and tx.country != customer.home,
            hour_share=_hour_share(customer, tx.timestamp.hour),
            tiny_online=self._is_tiny_online(tx),
            tiny_online_1h=len(customer.tiny),
            terminal_fraud_rate=terminal.frauds / len(terminal.known) if terminal.known else 0.0,
            terminal_labelled=len(terminal.known),
        )

    def observe(self, tx: Transaction) -> None:
        """Add ``tx`` to the history; its label counts after ``label_delay``.

        Raises:
            ValueError: ``tx`` is older than a payment already seen.
        """
        now = self._advance(tx)
        customer = self._customers.setdefault(tx.customer_id, _Customer())
        customer.recent.append(now)
        if self._is_tiny_online(tx):
            customer.tiny.append(now)
        customer.count += 1
        customer.total += tx.amount
        log_amount = math.log1p(tx.amount)
        customer.log_total += log_amount
        customer.log_squares += log_amount * log_amount
        customer.last = now
        customer.countries[tx.country] += 1
        if customer.home is None or (
            customer.countries[tx.country] > customer.countries[customer.home]
        ):
            customer.home = tx.country
        customer.hours[tx.timestamp.hour] += 1
        if tx.is_fraud is not None:
            self._terminal(tx.terminal_id, now).pending.append((now, tx.is_fraud))

    def _advance(self, tx: Transaction) -> float:
        now = tx.timestamp.timestamp()
        if now < self._clock:
            raise ValueError(
                f"transaction {tx.transaction_id} at {tx.timestamp.isoformat()} is older than "
                "one already seen; sort the stream by timestamp"
            )
        self._clock = now
        customer = self._customers.get(tx.customer_id)
        if customer is not None:
            _drop_before(customer.recent, now - 7 * _DAY)
            _drop_before(customer.tiny, now - _HOUR)
        return now

    def _terminal(self, terminal_id: str, now: float) -> _Terminal:
        """The terminal's state with labels made known up to ``now`` and old ones dropped."""
        terminal = self._terminals.setdefault(terminal_id, _Terminal())
        cutoff = now - self._delay
        while terminal.pending and terminal.pending[0][0] <= cutoff:
            entry = terminal.pending.popleft()
            terminal.known.append(entry)
            terminal.frauds += entry[1]
        while terminal.known and terminal.known[0][0] <= cutoff - self._window:
            terminal.frauds -= terminal.known.popleft()[1]
        return terminal

    def _is_tiny_online(self, tx: Transaction) -> bool:
        return tx.channel == "online" and tx.amount <= self.config.tiny_amount


def build_features(
    rows: Iterable[Transaction], config: FeatureConfig | None = None
) -> list[Features]:
    """Features of every row of a time-ordered stream, each from the rows before it.

    Raises:
        ValueError: the rows are not sorted by timestamp.
    """
    builder = FeatureBuilder(config)
    features: list[Features] = []
    for tx in rows:
        features.append(builder.features_for(tx))
        builder.observe(tx)
    return features


def feature_vector(features: Features) -> list[float]:
    """Numbers for the classical baseline, in ``FEATURE_NAMES`` order."""
    f = features
    mcc = f.merchant_category
    angle = 2 * math.pi * f.hour / 24
    since = _NO_PREVIOUS_HOURS if f.hours_since_last is None else f.hours_since_last
    return [
        math.log1p(f.amount),
        float(f.channel == "online"),
        float(int(mcc)),
        float(mcc in RISKY_MERCHANT_CATEGORIES),
        float(mcc == "4829"),
        float(mcc == "6051"),
        float(mcc == "7995"),
        math.sin(angle),
        math.cos(angle),
        1.0 if f.hour_share is None else f.hour_share,
        float(f.foreign),
        math.log1p(f.customer_history),
        float(f.count_1h),
        float(f.count_24h),
        float(f.count_7d),
        math.log1p(f.avg_amount),
        math.log1p(f.amount_ratio),
        f.amount_zscore,
        math.log1p(since),
        float(f.tiny_online),
        float(f.tiny_online_1h),
        f.terminal_fraud_rate,
        math.log1p(f.terminal_labelled),
    ]


def render_prompt(tx: Transaction, features: Features) -> str:
    """A terse, deterministic description of the payment, ending in the question.

    The strongest signals come first (the terminal's known fraud rate, the amount against the
    customer's own history, a burst of tiny online payments), then the payment itself. A
    number is followed by a word for its level where one helps (``very high``, ``burst``,
    ``odd hour``): a fine-tuned model reads a word faster than it learns to compare digits.

    Every token is paid for at scoring time (scoring is one prefill), and each digit is a
    SmolLM2 token, so numbers are rounded to two significant figures, the currency and the
    average amount are left out (the ratio carries them) and the tiny-payment count appears
    only when there is one. About 41 SmolLM2 tokens at the median (format 2 took 86). The
    answer is ``LABEL_FRAUD`` or ``LABEL_LEGIT``.
    """
    f = features
    mcc = tx.merchant_category
    what = MERCHANT_CATEGORIES.get(mcc, f"MCC {mcc}")
    if mcc in RISKY_MERCHANT_CATEGORIES:
        what += " risky"
    channel = "online" if tx.channel == "online" else "in person"
    if not f.terminal_labelled:
        terminal = "new terminal"
    else:
        terminal = f"terminal {_percent(f.terminal_fraud_rate)}"
        if f.terminal_fraud_rate >= _HIGH_TERMINAL_RATE:
            terminal += " high"
    amount = _number(tx.amount)
    if f.home_country is None:
        where, history = tx.country, f"{amount}, first"
    else:
        where = f"abroad {tx.country}" if f.foreign else "home"
        history = (
            f"{amount} {_number(f.amount_ratio)}x {_level(f.amount_ratio)}, "
            f"{f.count_1h}/1h {f.count_24h}/day, last {_since(f.hours_since_last)}"
        )
    tiny = ""
    if f.tiny_online_1h:
        tiny = f" tiny {f.tiny_online_1h}/1h"
        tiny += " burst;" if f.tiny_online_1h >= _TINY_BURST else ";"
    hour = ""
    if f.hour_share is not None:
        hour = f", {_hour_level(f.hour_share)} hour"
    return f"{terminal}; {history};{tiny} {channel} {what}, {where}{hour}{PROMPT_QUESTION}"


def _level(ratio: float) -> str:
    if ratio >= _VERY_HIGH_RATIO:
        return "very high"
    if ratio >= _HIGH_RATIO:
        return "high"
    return "low" if ratio < _LOW_RATIO else "usual"


def _hour_level(share: float) -> str:
    if share < _ODD_HOUR_SHARE:
        return "odd"
    return "rare" if share < _RARE_HOUR_SHARE else "usual"


def _since(hours: float | None) -> str:
    hours = hours or 0.0
    if hours < 1:
        return f"{60 * hours:.0f}m"
    return f"{hours:.0f}h" if hours < 48 else f"{hours / 24:.0f}d"


def _number(x: float) -> str:
    # Two significant figures at most, without exponents: 0.04, 0.7, 9.7, 27, 174.
    if x >= 10:
        return f"{x:.0f}"
    if x >= 0.1:
        return f"{x:.1f}".removesuffix(".0")
    return f"{x:.2f}"


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%"


def _zscore(customer: _Customer, amount: float) -> float:
    if customer.count < 2:
        return 0.0
    mean = customer.log_total / customer.count
    variance = max(customer.log_squares / customer.count - mean * mean, 0.0)
    # Floor the spread: a customer who always pays the same amount is not infinitely surprised.
    return (math.log1p(amount) - mean) / max(math.sqrt(variance), 0.1)


def _hour_share(customer: _Customer, hour: int) -> float | None:
    if not customer.count:
        return None
    near = range(hour - _HOUR_NEIGHBOURHOOD, hour + _HOUR_NEIGHBOURHOOD + 1)
    return sum(customer.hours[h % 24] for h in near) / customer.count


def _drop_before(times: deque[float], cutoff: float) -> None:
    while times and times[0] <= cutoff:
        times.popleft()
