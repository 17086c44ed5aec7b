"""The card-transaction record and its CSV / JSONL readers and writers.

Columns, in file order (``COLUMNS``)::

    transaction_id     non-empty string
    timestamp          ISO 8601; an offset is kept as UTC, a naive time is read as UTC
    customer_id        non-empty string
    terminal_id        non-empty string
    amount             finite, >= 0, in ``currency`` units
    currency           ISO 4217 code, three upper-case letters
    merchant_category  ISO 18245 merchant category code (MCC): exactly four digits
    channel            ``card_present`` or ``online``
    country            ISO 3166-1 alpha-2 code of the merchant, upper case
    is_fraud           0 or 1; optional: empty (CSV), ``null`` or absent (JSONL) means unknown

The format follows the file extension: ``.csv`` or ``.jsonl`` (``.ndjson`` too).

Reading validates row by row and never drops a row silently: a row with any bad field is
reported as one ``RowError`` per bad field (1-based physical line number of the file, where
the CSV header is line 1) and left out of ``ReadResult.rows``; every other row is returned.
Extra columns are ignored. When the CSV header lacks a required column, every data row would
fail on it, so the file is reported once instead: one ``RowError`` on line 1 per missing
column (``field`` names the column) and no rows.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TextIO

if TYPE_CHECKING:
    import _csv

Channel = Literal["card_present", "online"]
CHANNELS: Final[tuple[Channel, ...]] = ("card_present", "online")

COLUMNS: Final[tuple[str, ...]] = (
    "transaction_id",
    "timestamp",
    "customer_id",
    "terminal_id",
    "amount",
    "currency",
    "merchant_category",
    "channel",
    "country",
    "is_fraud",
)
REQUIRED_COLUMNS: Final[tuple[str, ...]] = COLUMNS[:-1]

# ISO 3166-1 alpha-2, all 249 officially assigned codes (from tzdata's iso3166.tab).
_COUNTRY_CODES: Final = """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO
    DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU
    GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW
    KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU
    MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW
    PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF
    TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA
    ZM ZW"""
COUNTRIES: Final[frozenset[str]] = frozenset(_COUNTRY_CODES.split())

# Short English names for the merchant categories the example uses; prompts fall back to the
# bare code for any other MCC.
MERCHANT_CATEGORIES: Final[Mapping[str, str]] = {
    "4111": "commuter transport",
    "4121": "taxi",
    "4511": "airline",
    "4814": "telecom",
    "4829": "wire transfer",
    "5311": "department store",
    "5411": "grocery",
    "5541": "fuel",
    "5651": "clothing",
    "5712": "furniture",
    "5732": "electronics",
    "5812": "restaurant",
    "5814": "fast food",
    "5815": "digital goods",
    "5912": "pharmacy",
    "5942": "books",
    "5944": "jewelry",
    "5999": "misc retail",
    "6051": "quasi-cash",
    "7011": "hotel",
    "7995": "gambling",
}
# Wire transfer, quasi-cash (crypto, foreign currency, money orders) and gambling: where
# stolen card money is cashed out fastest.
RISKY_MERCHANT_CATEGORIES: Final[frozenset[str]] = frozenset({"4829", "6051", "7995"})

_FILE_LEVEL_LINE: Final = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Transaction:
    """One card payment; ``is_fraud`` is None when the label is unknown."""

    transaction_id: str
    timestamp: datetime  # timezone-aware, UTC
    customer_id: str
    terminal_id: str
    amount: float
    currency: str
    merchant_category: str
    channel: Channel
    country: str
    is_fraud: int | None = None

    def __post_init__(self) -> None:
        for name in ("transaction_id", "customer_id", "terminal_id"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty; give a non-empty identifier")
        if self.timestamp.tzinfo is None:
            raise ValueError(f"timestamp {self.timestamp} is naive; attach a timezone (UTC)")
        # Hours of day and ISO output are in UTC whatever zone the caller used.
        object.__setattr__(self, "timestamp", self.timestamp.astimezone(UTC))
        _check_amount(self.amount)
        _check_currency(self.currency)
        _check_merchant_category(self.merchant_category)
        _check_channel(self.channel)
        _check_country(self.country)
        if self.is_fraud is not None and (
            type(self.is_fraud) is not int or self.is_fraud not in (0, 1)
        ):
            raise ValueError(f"is_fraud {self.is_fraud!r} must be 0, 1 or None")


@dataclass(frozen=True, slots=True)
class RowError:
    """A field that could not be read; ``line_number`` is the 1-based line in the file, and
    ``transaction_id`` the row's identifier where it could be read ("" otherwise)."""

    line_number: int
    field: str
    message: str
    transaction_id: str = ""


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Valid rows in file order, and one error per bad field of every rejected row."""

    rows: list[Transaction]
    errors: list[RowError]


def read_transactions(path: str | Path) -> ReadResult:
    """Read a ``.csv`` or ``.jsonl`` file, validating every row (see the module docstring).

    Raises:
        ValueError: the extension is neither CSV nor JSONL.
        OSError: the file cannot be opened.
    """
    path = Path(path)
    fmt = _format_of(path)
    # utf-8-sig: spreadsheet exports start with a byte-order mark, which is not a column name.
    with path.open(encoding="utf-8-sig", newline="") as stream:
        return _read_csv(stream) if fmt == "csv" else _read_jsonl(stream)


def write_transactions(
    path: str | Path, rows: Iterable[Transaction], *, include_labels: bool = True
) -> int:
    """Write rows to a ``.csv`` or ``.jsonl`` file; returns the number of rows written.

    With ``include_labels=False`` the ``is_fraud`` column is left out (a file to be scored).

    Raises:
        ValueError: the extension is neither CSV nor JSONL.
    """
    path = Path(path)
    fmt = _format_of(path)
    columns = COLUMNS if include_labels else REQUIRED_COLUMNS
    count = 0
    with path.open("w", encoding="utf-8", newline="") as stream:
        if fmt == "csv":
            writer = csv.writer(stream, lineterminator="\n")
            writer.writerow(columns)
            for row in rows:
                record = to_record(row)
                writer.writerow(["" if record[c] is None else record[c] for c in columns])
                count += 1
        else:
            for row in rows:
                record = to_record(row)
                stream.write(json.dumps({c: record[c] for c in columns}) + "\n")
                count += 1
    return count


def to_record(row: Transaction) -> dict[str, str | float | int | None]:
    """The row as a column → value mapping (timestamp as ISO 8601 text in UTC)."""
    return {
        "transaction_id": row.transaction_id,
        "timestamp": row.timestamp.astimezone(UTC).isoformat(),
        "customer_id": row.customer_id,
        "terminal_id": row.terminal_id,
        "amount": row.amount,
        "currency": row.currency,
        "merchant_category": row.merchant_category,
        "channel": row.channel,
        "country": row.country,
        "is_fraud": row.is_fraud,
    }


def parse_record(record: Mapping[str, object], line_number: int) -> Transaction | list[RowError]:
    """Validate one mapping (a CSV row or a JSON object): the row, or its field errors."""
    errors: list[RowError] = []
    values: dict[str, object] = {}
    tx_id = _readable_id(record.get("transaction_id"))
    for column in COLUMNS:
        raw = record.get(column)
        if raw is None and column != "is_fraud":
            errors.append(RowError(line_number, column, "missing value", tx_id))
            continue
        try:
            values[column] = _PARSERS[column](raw)
        except ValueError as exc:
            errors.append(RowError(line_number, column, str(exc), tx_id))
    if errors:
        return errors
    return Transaction(**values)  # type: ignore[arg-type]  # every field parsed and checked


def _format_of(path: Path) -> Literal["csv", "jsonl"]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise ValueError(f"unsupported extension {suffix!r} for {path}; use .csv or .jsonl")


def _read_csv(stream: TextIO) -> ReadResult:
    reader = csv.reader(stream)
    header = next(reader, None)
    if header is None:
        return ReadResult([], [RowError(_FILE_LEVEL_LINE, "header", "empty file, no header")])
    header = [name.strip() for name in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        errors = [
            RowError(_FILE_LEVEL_LINE, c, "required column missing from the header")
            for c in missing
        ]
        return ReadResult([], errors)
    return _collect(_csv_records(reader, header))


def _csv_records(
    reader: _csv.Reader, header: list[str]
) -> Iterator[tuple[int, Mapping[str, object] | RowError]]:
    for cells in reader:
        line = reader.line_num
        if not cells:
            continue  # a blank line carries no row
        if len(cells) != len(header):
            message = f"expected {len(header)} values, found {len(cells)}"
            yield line, RowError(line, "row", message)
            continue
        yield line, dict(zip(header, cells, strict=True))


def _read_jsonl(stream: TextIO) -> ReadResult:
    return _collect(_jsonl_records(stream))


def _jsonl_records(stream: TextIO) -> Iterator[tuple[int, Mapping[str, object] | RowError]]:
    for line, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield line, RowError(line, "row", f"invalid JSON: {exc.msg}")
            continue
        if not isinstance(obj, dict):
            yield line, RowError(line, "row", f"expected a JSON object, found {type(obj).__name__}")
            continue
        yield line, obj


def _collect(records: Iterator[tuple[int, Mapping[str, object] | RowError]]) -> ReadResult:
    rows: list[Transaction] = []
    errors: list[RowError] = []
    for line, record in records:
        if isinstance(record, RowError):
            errors.append(record)
            continue
        parsed = parse_record(record, line)
        if isinstance(parsed, Transaction):
            rows.append(parsed)
        else:
            errors.extend(parsed)
    return ReadResult(rows, errors)


def _readable_id(raw: object) -> str:
    """The identifier, or "" where it is itself bad (a rejected row may still name itself)."""
    try:
        return _parse_identifier(raw)
    except ValueError:
        return ""


def _parse_identifier(raw: object) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise ValueError(f"expected a string identifier, found {raw!r}")
    text = str(raw).strip()
    if not text:
        raise ValueError("empty identifier")
    return text


def _parse_timestamp(raw: object) -> datetime:
    if not isinstance(raw, str):
        raise ValueError(f"expected an ISO 8601 string, found {raw!r}")
    try:
        stamp = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise ValueError(f"not an ISO 8601 timestamp: {raw!r}") from None
    if stamp.tzinfo is None:
        return stamp.replace(tzinfo=UTC)
    return stamp.astimezone(UTC)


def _parse_amount(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"expected a number, found {raw!r}")
    try:
        amount = float(raw)
    except ValueError:
        raise ValueError(f"not a number: {raw!r}") from None
    _check_amount(amount)
    return amount


def _parse_text(check: Callable[[str], None]) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, found {raw!r}")
        text = raw.strip()
        check(text)
        return text

    return parse


def _parse_label(raw: object) -> int | None:
    if raw is None or raw == "":
        return None
    if raw in (0, 1, "0", "1") and not isinstance(raw, bool | float):
        return int(str(raw))
    raise ValueError(f"is_fraud must be 0, 1 or empty, found {raw!r}")


def _check_amount(amount: float) -> None:
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"amount {amount!r} must be a finite number >= 0")


def _check_currency(code: str) -> None:
    if len(code) != 3 or not (code.isascii() and code.isalpha() and code.isupper()):
        raise ValueError(f"currency {code!r} is not an ISO 4217 code such as 'EUR'")


def _check_merchant_category(code: str) -> None:
    if len(code) != 4 or not (code.isascii() and code.isdigit()):
        raise ValueError(f"merchant_category {code!r} is not a 4-digit MCC such as '5411'")


def _check_channel(channel: str) -> None:
    if channel not in CHANNELS:
        raise ValueError(f"channel {channel!r} is unknown; use one of {', '.join(CHANNELS)}")


def _check_country(code: str) -> None:
    if code not in COUNTRIES:
        raise ValueError(f"country {code!r} is not an ISO 3166-1 alpha-2 code such as 'NL'")


_PARSERS: Final[Mapping[str, Callable[[object], object]]] = {
    "transaction_id": _parse_identifier,
    "timestamp": _parse_timestamp,
    "customer_id": _parse_identifier,
    "terminal_id": _parse_identifier,
    "amount": _parse_amount,
    "currency": _parse_text(_check_currency),
    "merchant_category": _parse_text(_check_merchant_category),
    "channel": _parse_text(_check_channel),
    "country": _parse_text(_check_country),
    "is_fraud": _parse_label,
}
