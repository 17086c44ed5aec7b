"""A decision comes from a probability only: NaN, infinities and out-of-range scores are
errors for their row, listed with the reason, never "legit"."""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import UTC, datetime

import pytest

from slimserve.clients import LabelScore, ScoreResult, Unavailable
from slimserve.fraud import LABEL_FRAUD, LABEL_LEGIT, RowError, Transaction
from slimserve.fraud.audit import (
    DECISION_ERROR,
    DECISION_REJECTED,
    OUTPUT_COLUMNS,
    output_records,
    write_scores,
)
from slimserve.fraud.scorer import (
    DECISION_FRAUD,
    DECISION_LEGIT,
    NotAProbability,
    ScoredRow,
    ScoreFailure,
    decide,
    fraud_probability,
    row_outcome,
)

BAD_SCORES = (math.nan, math.inf, -math.inf, 1.5, -0.25)


@pytest.mark.parametrize("score", BAD_SCORES)
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_a_score_that_is_not_a_probability_is_never_a_decision(
    score: float, threshold: float
) -> None:
    with pytest.raises(NotAProbability, match="not a probability"):
        decide(score, threshold)


def test_the_threshold_itself_flags() -> None:
    assert decide(0.5, 0.5) == DECISION_FRAUD
    assert decide(math.nextafter(0.5, 0.0), 0.5) == DECISION_LEGIT
    assert decide(0.0, 0.0) == DECISION_FRAUD
    assert decide(1.0, 1.0) == DECISION_FRAUD


def _result(p_fraud: float) -> ScoreResult:
    return ScoreResult(
        request_id="r1",
        model="fraud-scorer@3",
        model_digest="ab" * 32,
        scores=(
            LabelScore(LABEL_FRAUD, math.log(p_fraud) if 0 < p_fraud <= 1 else p_fraud, p_fraud, 1),
            LabelScore(LABEL_LEGIT, -1.0, 0.3, 1),
        ),
        input_tokens=40,
        latency_ms=2.5,
    )


_TX = Transaction(
    transaction_id="tx-1",
    timestamp=datetime(2026, 1, 2, 10, 0, tzinfo=UTC),
    customer_id="C1",
    terminal_id="T1",
    amount=12.5,
    currency="EUR",
    merchant_category="5411",
    channel="online",
    country="NL",
)


@pytest.mark.parametrize("score", BAD_SCORES)
def test_a_row_whose_score_is_not_a_probability_is_an_error_naming_the_model(
    score: float,
) -> None:
    with pytest.raises(NotAProbability, match="fraud-scorer@3"):
        fraud_probability(_result(score))

    outcome = row_outcome(_TX, _result(score), threshold=0.5)

    assert isinstance(outcome, ScoreFailure)
    assert outcome.transaction_id == "tx-1"
    assert (outcome.model_version, outcome.model_digest) == ("fraud-scorer@3", "ab" * 32)
    assert "not a probability" in outcome.message and "abababababab" in outcome.message


def test_a_probability_is_a_scored_row_and_a_refusal_a_failure() -> None:
    scored = row_outcome(_TX, _result(0.7), threshold=0.5)
    refused = row_outcome(_TX, Unavailable("UNAVAILABLE", "draining"), threshold=0.5)

    assert scored == ScoredRow(
        transaction_id="tx-1",
        score=0.7,
        decision=DECISION_FRAUD,
        model_version="fraud-scorer@3",
        model_digest="ab" * 32,
        latency_ms=2.5,
    )
    assert refused == ScoreFailure("tx-1", "UNAVAILABLE: draining")


def test_every_row_is_written_with_its_reason_in_csv_and_jsonl() -> None:
    outcomes = [
        row_outcome(_TX, _result(0.7), threshold=0.5),
        row_outcome(_TX, _result(math.nan), threshold=0.5),
    ]
    rejected = [
        RowError(9, "channel", "unknown channel 'mail_order'", "tx-9"),
        RowError(7, "amount", "not a number: 'abc'"),
        RowError(9, "amount", "negative"),
    ]
    records = output_records(outcomes, rejected, threshold=0.5, prompt_format=3)

    text = io.StringIO()
    write_scores(text, records, "csv")
    rows = list(csv.DictReader(io.StringIO(text.getvalue())))
    assert tuple(rows[0]) == OUTPUT_COLUMNS
    assert [(r["transaction_id"], r["decision"]) for r in rows] == [
        ("tx-1", DECISION_FRAUD),
        ("tx-1", DECISION_ERROR),
        ("", DECISION_REJECTED),  # line 7 before line 9
        ("tx-9", DECISION_REJECTED),
    ]
    assert rows[0]["score"] == "0.700000" and rows[0]["model_digest"] == "ab" * 32
    assert all(r["threshold"] == "0.5" and r["prompt_format"] == "3" for r in rows)
    assert rows[1]["score"] == "" and "not a probability" in rows[1]["reason"]
    assert rows[2]["reason"] == "line 7: amount: not a number: 'abc'"
    assert rows[3]["reason"] == "line 9: channel: unknown channel 'mail_order'; amount: negative"

    text = io.StringIO()
    write_scores(text, records, "jsonl")
    lines = [json.loads(line) for line in text.getvalue().splitlines()]
    assert [tuple(obj) for obj in lines] == [OUTPUT_COLUMNS] * 4
    assert lines[0]["score"] == 0.7 and lines[0]["threshold"] == 0.5
    assert lines[1]["score"] is None and lines[3]["prompt_format"] == 3
