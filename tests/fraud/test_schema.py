from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from slimserve.fraud import (
    COLUMNS,
    RowError,
    Simulation,
    Transaction,
    read_transactions,
    write_transactions,
)

GOOD = "X1,2026-01-02T10:00:00+00:00,C1,T1,12.50,EUR,5411,card_present,NL,0"


def _tx(**changes: object) -> Transaction:
    base = Transaction(
        transaction_id="X1",
        timestamp=datetime(2026, 1, 2, 10, tzinfo=UTC),
        customer_id="C1",
        terminal_id="T1",
        amount=12.5,
        currency="EUR",
        merchant_category="5411",
        channel="card_present",
        country="NL",
        is_fraud=0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_round_trip_keeps_every_row(tmp_path: Path, small: Simulation, suffix: str) -> None:
    rows = [*small.transactions[:500], _tx(transaction_id="unlabelled", is_fraud=None)]
    path = tmp_path / f"payments{suffix}"

    assert write_transactions(path, rows) == len(rows)
    result = read_transactions(path)

    assert result.errors == []
    assert result.rows == rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_to_score_has_no_labels(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"to_score{suffix}"
    write_transactions(path, [_tx(is_fraud=1)], include_labels=False)

    result = read_transactions(path)

    assert "is_fraud" not in path.read_text()
    assert result.rows == [_tx(is_fraud=None)]


def test_bad_csv_rows_are_reported_by_line_and_good_rows_kept(tmp_path: Path) -> None:
    lines = [
        ",".join(COLUMNS),
        GOOD,  # line 2
        "X2,2026-01-02T10:00:00+00:00,C1,T1,12.50,EUR,5411,card_present",  # 3: a value short
        "X3,yesterday,C1,T1,12.50,EUR,5411,card_present,NL,0",  # 4
        "X4,2026-01-02T10:00:00+00:00,C1,T1,twelve,EUR,5411,card_present,NL,0",  # 5
        "X5,2026-01-02T10:00:00+00:00,C1,T1,12.50,EUR,5411,by_phone,NL,0",  # 6
        "X6,2026-01-02T10:00:00+00:00,C1,T1,12.50,EUR,541,online,XX,2",  # 7: three bad fields
        "X7,2026-01-02T10:00:00+00:00,,T1,-3,EUR,5411,online,NL,",  # 8: two bad fields
        GOOD.replace("X1", "X8").replace(",0", ","),  # 9: unlabelled is fine
    ]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")

    result = read_transactions(path)

    assert [r.transaction_id for r in result.rows] == ["X1", "X8"]
    assert result.rows[1].is_fraud is None
    found = {(e.line_number, e.field) for e in result.errors}
    assert found == {
        (3, "row"),
        (4, "timestamp"),
        (5, "amount"),
        (6, "channel"),
        (7, "merchant_category"),
        (7, "country"),
        (7, "is_fraud"),
        (8, "customer_id"),
        (8, "amount"),
    }
    assert all(e.message for e in result.errors)
    # A rejected row still names itself where its identifier could be read.
    ids = {e.line_number: e.transaction_id for e in result.errors}
    assert ids == {3: "", 4: "X3", 5: "X4", 6: "X5", 7: "X6", 8: "X7"}


def test_a_rejected_row_with_a_bad_identifier_names_none(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(",".join(COLUMNS) + "\n" + GOOD.replace("X1,", " ,").replace("EUR", "E") + "\n")

    errors = read_transactions(path).errors

    assert {(e.field, e.transaction_id) for e in errors} == {
        ("transaction_id", ""),
        ("currency", ""),
    }


def test_bad_jsonl_rows_are_reported_by_line_and_good_rows_kept(tmp_path: Path) -> None:
    good = (
        '{"transaction_id": "X1", "timestamp": "2026-01-02T10:00:00Z", "customer_id": "C1", '
        '"terminal_id": "T1", "amount": 12.5, "currency": "EUR", "merchant_category": "5411", '
        '"channel": "online", "country": "NL", "is_fraud": 1}'
    )
    lines = [
        good,
        good.replace('"amount": 12.5, ', ""),  # 2: missing column
        "{not json",  # 3
        "[1, 2]",  # 4
        "",  # 5: blank lines carry no row
        good.replace('"online"', '"atm"').replace('"X1"', '"X6"'),  # 6
        good.replace('"X1"', '"X7"').replace('"is_fraud": 1', '"is_fraud": null'),  # 7
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")

    result = read_transactions(path)

    assert [r.transaction_id for r in result.rows] == ["X1", "X7"]
    assert result.rows[0].timestamp == datetime(2026, 1, 2, 10, tzinfo=UTC)
    assert [(e.line_number, e.field) for e in result.errors] == [
        (2, "amount"),
        (3, "row"),
        (4, "row"),
        (6, "channel"),
    ]
    assert result.errors[0].message == "missing value"


def test_a_header_without_a_required_column_is_one_file_level_error(tmp_path: Path) -> None:
    header = ",".join(c for c in COLUMNS if c != "channel")
    path = tmp_path / "no_channel.csv"
    path.write_text(header + "\n" + GOOD.replace("card_present,", "") + "\n")

    result = read_transactions(path)

    assert result.rows == []
    assert result.errors == [RowError(1, "channel", "required column missing from the header")]


def test_timestamps_are_kept_in_utc(tmp_path: Path) -> None:
    path = tmp_path / "zones.csv"
    rows = [GOOD.replace("+00:00", "+02:00"), GOOD.replace("+00:00", "").replace("X1", "X2")]
    path.write_text(",".join(COLUMNS) + "\n" + "\n".join(rows) + "\n")

    first, second = read_transactions(path).rows

    assert first.timestamp == datetime(2026, 1, 2, 8, tzinfo=UTC)
    assert second.timestamp == datetime(2026, 1, 2, 10, tzinfo=UTC)
    assert first.timestamp.utcoffset() == timedelta(0)


def test_an_unknown_extension_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported extension"):
        read_transactions(tmp_path / "payments.parquet")
    with pytest.raises(ValueError, match="unsupported extension"):
        write_transactions(tmp_path / "payments.txt", [])


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"timestamp": datetime(2026, 1, 2)}, "naive"),  # naive on purpose
        ({"amount": float("nan")}, "amount"),
        ({"currency": "eur"}, "currency"),
        ({"merchant_category": "54111"}, "merchant_category"),
        ({"channel": "atm"}, "channel"),
        ({"country": "UK"}, "country"),
        ({"is_fraud": 2}, "is_fraud"),
        ({"is_fraud": -1}, "is_fraud"),
        ({"is_fraud": True}, "is_fraud"),
        ({"terminal_id": ""}, "terminal_id"),
    ],
)
def test_a_transaction_validates_its_fields(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _tx(**changes)


def test_an_aware_timestamp_in_another_zone_is_accepted() -> None:
    tx = _tx(timestamp=datetime(2026, 1, 2, 12, tzinfo=timezone(timedelta(hours=2))))

    assert tx.timestamp == datetime(2026, 1, 2, 10, tzinfo=UTC)
    assert (tx.timestamp.hour, tx.timestamp.utcoffset()) == (10, timedelta(0))
