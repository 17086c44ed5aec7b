"""What a score run writes down: one output row per input row, scored or not, and why.

A scored row carries its score, the decision, the served ``name@version`` and the artifact
digest the server answered with, the decision threshold and the prompt format, so a
decision can be traced to the exact model and rule that made it. A row that has no score
says why instead: ``rejected`` (it failed validation; the reason names the line and the
fields) or ``error`` (the server refused it, or returned a probability that is no
probability). Written as CSV or JSONL with ``OUTPUT_COLUMNS``.

Imports only ``slimserve.fraud.schema``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Final, Literal, TextIO

from slimserve.fraud.schema import RowError

# The first five are the columns of earlier releases, in their order.
OUTPUT_COLUMNS: Final = (
    "transaction_id",
    "score",
    "decision",
    "model_version",
    "latency_ms",
    "model_digest",
    "threshold",
    "prompt_format",
    "reason",
)
DECISION_FRAUD: Final = "fraud"
DECISION_LEGIT: Final = "legit"
DECISION_REJECTED: Final = "rejected"  # failed validation: never sent to the server
DECISION_ERROR: Final = "error"  # sent, but no usable score came back

OutputFormat = Literal["csv", "jsonl"]
Record = dict[str, str | float | int | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoredRow:
    """One scored row; ``model_version`` is the served ``name@version``, ``model_digest``
    the digest of the artifact that answered."""

    transaction_id: str
    score: float  # probability of fraud, 0..1
    decision: str  # DECISION_FRAUD when score >= threshold, else DECISION_LEGIT
    model_version: str
    model_digest: str
    latency_ms: float  # client-side round trip of the Score call


@dataclass(frozen=True, slots=True)
class ScoreFailure:
    """A valid row that got no decision: the server refused it, or its score was not a
    probability (then the model that answered is named)."""

    transaction_id: str
    message: str
    model_version: str = ""
    model_digest: str = ""


def output_format(path: Path | None) -> OutputFormat:
    """JSONL for a ``.jsonl`` or ``.ndjson`` path, CSV otherwise (and for stdout)."""
    if path is not None and path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    return "csv"


def output_records(
    outcomes: Sequence[ScoredRow | ScoreFailure],
    rejected: Sequence[RowError],
    *,
    threshold: float,
    prompt_format: int,
) -> list[Record]:
    """The valid rows in their order, then every rejected line in file order."""
    run = {"threshold": threshold, "prompt_format": prompt_format}
    records = [{**_outcome(o), **run} for o in outcomes]
    by_line = groupby(sorted(rejected, key=lambda e: e.line_number), key=lambda e: e.line_number)
    records += [{**_rejected(line, list(errors)), **run} for line, errors in by_line]
    return [{c: r.get(c) for c in OUTPUT_COLUMNS} for r in records]


def write_scores(out: TextIO, records: Sequence[Record], fmt: OutputFormat = "csv") -> None:
    """CSV with a header of ``OUTPUT_COLUMNS`` (score to 6 decimals, latency to 0.01 ms, an
    empty cell for no value), or one JSON object per line (``null`` for no value)."""
    if fmt == "jsonl":
        for r in records:
            out.write(json.dumps(r) + "\n")
        return
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(OUTPUT_COLUMNS)
    for r in records:
        writer.writerow([_cell(c, r[c]) for c in OUTPUT_COLUMNS])


def _outcome(o: ScoredRow | ScoreFailure) -> Record:
    if isinstance(o, ScoreFailure):
        return {
            "transaction_id": o.transaction_id,
            "decision": DECISION_ERROR,
            "model_version": o.model_version,
            "model_digest": o.model_digest,
            "reason": o.message,
        }
    return {
        "transaction_id": o.transaction_id,
        "score": o.score,
        "decision": o.decision,
        "model_version": o.model_version,
        "model_digest": o.model_digest,
        "latency_ms": o.latency_ms,
        "reason": "",
    }


def _rejected(line: int, errors: Sequence[RowError]) -> Record:
    fields = "; ".join(f"{e.field}: {e.message}" for e in errors)
    return {
        "transaction_id": next((e.transaction_id for e in errors if e.transaction_id), ""),
        "decision": DECISION_REJECTED,
        "model_version": "",
        "model_digest": "",
        "reason": f"line {line}: {fields}",
    }


def _cell(column: str, value: str | float | int | None) -> str:
    if value is None:
        return ""
    if column == "score":
        return f"{value:.6f}"
    if column == "latency_ms":
        return f"{value:.2f}"
    return str(value)
