"""Score a file of card payments through a slimserve server, one ``Score`` call per payment.

Rows are validated as ``read_transactions`` validates them: every bad field is reported with
its line number and the row is left out; every valid row is scored. Features come from the
payments before each one in time (the file is sorted by timestamp, stably, so an unsorted
export still yields causal features), and the prompt is ``render_prompt``'s. The score is
the probability the model gives ``LABEL_FRAUD`` against ``LABEL_LEGIT`` after the prompt, so
it lies in [0, 1]; a value that does not (NaN, infinite) is an error for that row, never a
decision (``decide``). The output (``slimserve.fraud.audit``) has one row per input row:
valid rows in the file's order, each with its score, decision, the served version and its
digest, the threshold and the prompt format, or the reason it has none; then the rejected
lines with theirs.

A call the server refuses for that row alone (``InvalidArgument``, e.g. a prompt longer than
the model's context; ``Overloaded`` after retries) is reported per row and counted; anything
else (model not loaded, server down) ends the run, since every other row would fail too.

Only ``slimserve.clients`` and the fraud modules are used: no torch, no server code.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from slimserve.clients import (
    ChatMessage,
    Client,
    ClientError,
    FailedPrecondition,
    InvalidArgument,
    ModelInfo,
    Overloaded,
    ScoreResult,
    Structured,
)
from slimserve.fraud.audit import (
    DECISION_FRAUD,
    DECISION_LEGIT,
    OUTPUT_COLUMNS,
    OutputFormat,
    ScoredRow,
    ScoreFailure,
    output_records,
    write_scores,
)
from slimserve.fraud.features import (
    LABEL_FRAUD,
    LABEL_LEGIT,
    PROMPT_FORMAT,
    PROMPT_QUESTION,
    FeatureConfig,
    build_features,
    render_prompt,
)
from slimserve.fraud.metrics import LatencySummary, latency_summary
from slimserve.fraud.schema import RowError, Transaction, read_transactions

__all__ = [
    "DECISION_FRAUD",
    "DECISION_LEGIT",
    "OUTPUT_COLUMNS",
    "SCORE_LABELS",
    "NotAProbability",
    "ScoreFailure",
    "ScoreOptions",
    "ScoreSummary",
    "ScoredRow",
    "check_prompt_format",
    "decide",
    "explain",
    "fraud_probability",
    "row_outcome",
    "score_file",
    "score_outcomes",
    "score_prompts",
    "score_rows",
    "stream_prompts",
    "time_sorted",
]

# Sent to Score in this order; the score is the first label's probability.
SCORE_LABELS: Final = (LABEL_FRAUD, LABEL_LEGIT)

_OVERLOAD_RETRIES: Final = 5
_OVERLOAD_BACKOFF_S: Final = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreOptions:
    """How to score: the model reference, the decision threshold, parallel calls, and
    whether to stream a JSON verdict (`VERDICT_SCHEMA`, at most ``explain_tokens`` tokens)
    per flagged row, for the first ``explain_max`` of them (0: every one)."""

    model: str
    threshold: float = 0.5
    concurrency: int = 1
    explain: bool = False
    explain_tokens: int = 64
    explain_max: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} must be in [0, 1], e.g. 0.5")
        if self.concurrency < 1:
            raise ValueError(f"concurrency {self.concurrency} must be >= 1")
        if self.explain_tokens < 1:
            raise ValueError(f"explain_tokens {self.explain_tokens} must be >= 1, e.g. 64")
        if self.explain_max < 0:
            raise ValueError(f"explain_max {self.explain_max} must be >= 0 (0: every row)")


class NotAProbability(ValueError):
    """A score that is NaN, infinite or outside [0, 1]: it must not become a decision
    (``nan >= threshold`` is False, which would approve the payment)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreSummary:
    """What a run did: rejected input lines, scored rows, and valid rows without a decision
    (the server refused them, or their score was not a probability)."""

    errors: tuple[RowError, ...]
    scored: tuple[ScoredRow, ...]
    failed: tuple[ScoreFailure, ...]
    wall_s: float
    #: Of ``wall_s``, the seconds spent scoring (features and Score calls, explanations
    #: included), what the rows per second are measured over; 0 = not measured.
    scoring_s: float = 0.0

    @property
    def rejected(self) -> int:
        """Input lines that failed validation (a line with several bad fields counts once)."""
        return len({e.line_number for e in self.errors})

    @property
    def flagged(self) -> int:
        return sum(r.decision == DECISION_FRAUD for r in self.scored)

    @property
    def latency(self) -> LatencySummary | None:
        """Percentiles of the scored rows' client round trips (None when none was scored)."""
        if not self.scored:
            return None
        return latency_summary([r.latency_ms for r in self.scored])

    def describe(self) -> str:
        """A one-line summary for people; with scored rows, their latency percentiles and
        the rows per second while scoring."""
        text = (
            f"scored {len(self.scored)} rows ({self.flagged} flagged), rejected "
            f"{self.rejected} lines, no decision for {len(self.failed)} rows, "
            f"in {self.wall_s:.1f} s"
        )
        lat = self.latency
        if lat is not None:
            text += (
                f"; Score latency p50 {lat.p50_ms:.1f} ms, p90 {lat.p90_ms:.1f} ms, "
                f"p99 {lat.p99_ms:.1f} ms; "
                f"{len(self.scored) / (self.scoring_s or self.wall_s):.1f} rows/s"
            )
        return text


def decide(score: float, threshold: float) -> str:
    """``DECISION_FRAUD`` when ``score >= threshold``, else ``DECISION_LEGIT``.

    Raises:
        NotAProbability: ``score`` is NaN, infinite or outside [0, 1].
    """
    if not _is_probability(score):
        raise NotAProbability(f"fraud score {score!r} is not a probability in [0, 1]; no decision")
    return DECISION_FRAUD if score >= threshold else DECISION_LEGIT


def fraud_probability(result: ScoreResult) -> float:
    """The probability of ``LABEL_FRAUD`` in ``result``.

    Raises:
        NotAProbability: it is NaN, infinite or outside [0, 1] (the model is named).
    """
    score = result.probability(LABEL_FRAUD)
    if not _is_probability(score):
        raise NotAProbability(
            f"{result.model} ({result.model_digest[:12]}) returned fraud probability {score!r}, "
            "which is not a probability in [0, 1]; no decision was made"
        )
    return score


def _is_probability(score: float) -> bool:
    return math.isfinite(score) and 0.0 <= score <= 1.0


def stream_prompts(rows: Sequence[Transaction], config: FeatureConfig | None = None) -> list[str]:
    """``render_prompt`` of every row, its features built from the rows before it.

    Raises:
        ValueError: the rows are not sorted by timestamp.
    """
    features = build_features(rows, config)
    return [render_prompt(tx, f) for tx, f in zip(rows, features, strict=True)]


def check_prompt_format(info: ModelInfo) -> None:
    """Refuse a model trained on prompts another ``PROMPT_FORMAT`` wrote: its scores would be
    silently meaningless. ``info`` is the served version's (``Client.model_info``). Versions
    without the metric (made by older releases) pass; a compressed version keeps its parent's.

    Raises:
        FailedPrecondition: the model records another prompt format.
    """
    trained = info.metrics.get("prompt_format")
    if trained is not None and int(trained) != PROMPT_FORMAT:
        raise FailedPrecondition(
            "FAILED_PRECONDITION",
            f"{info.ref} was trained on fraud prompt format {int(trained)}, and this client "
            f"writes format {PROMPT_FORMAT}; retrain it with `slimserve fraud train` or score "
            "with the client release that trained it",
        )


def time_sorted(rows: Sequence[Transaction]) -> list[Transaction]:
    """The rows by timestamp; rows with equal timestamps keep their order."""
    return sorted(rows, key=lambda tx: tx.timestamp)


def score_prompts(
    client: Client, prompts: Sequence[str], model: str, *, concurrency: int = 1
) -> list[ScoreResult | ClientError]:
    """One ``Score`` call per prompt, ``concurrency`` at a time, results in prompt order.

    A row-level refusal (``InvalidArgument``, or ``Overloaded`` after retries) is returned
    in that row's place.

    Raises:
        ClientError: any other failure (model not loaded, server unavailable, ...).
    """

    def one(prompt: str) -> ScoreResult | ClientError:
        return _score_one(client, prompt, model)

    if concurrency == 1:
        return [one(p) for p in prompts]
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="score") as pool:
        return list(pool.map(one, prompts))


def score_rows(
    client: Client,
    rows: Sequence[Transaction],
    options: ScoreOptions,
    *,
    explain_to: TextIO | None = None,
) -> tuple[list[ScoredRow], list[ScoreFailure]]:
    """``score_outcomes`` split into the scored rows and the failures, each in row order."""
    outcomes = score_outcomes(client, rows, options, explain_to=explain_to)
    scored = [o for o in outcomes if isinstance(o, ScoredRow)]
    return scored, [o for o in outcomes if isinstance(o, ScoreFailure)]


def score_outcomes(
    client: Client,
    rows: Sequence[Transaction],
    options: ScoreOptions,
    *,
    explain_to: TextIO | None = None,
) -> list[ScoredRow | ScoreFailure]:
    """Score valid rows; one outcome per row, in the order of ``rows``.

    With ``options.explain`` and ``explain_to``, each flagged row's explanation is streamed
    there as it is generated.

    Raises:
        ClientError: a failure that is not about one row (see ``score_prompts``).
    """
    check_prompt_format(client.model_info(options.model))
    order = sorted(range(len(rows)), key=lambda i: rows[i].timestamp)
    prompts = stream_prompts([rows[i] for i in order], options.features)
    results = score_prompts(client, prompts, options.model, concurrency=options.concurrency)
    by_row: dict[int, tuple[str, ScoreResult | ClientError]] = {
        i: (prompt, result) for i, prompt, result in zip(order, prompts, results, strict=True)
    }
    outcomes: list[ScoredRow | ScoreFailure] = []
    explained = 0
    for i, tx in enumerate(rows):
        prompt, result = by_row[i]
        outcome = row_outcome(tx, result, options.threshold)
        outcomes.append(outcome)
        if (
            options.explain
            and explain_to is not None
            and isinstance(outcome, ScoredRow)
            and outcome.decision == DECISION_FRAUD
            and (not options.explain_max or explained < options.explain_max)
        ):
            explain(client, prompt, outcome, options, explain_to)
            explained += 1
    return outcomes


#: What `explain` may name as a reason: the signals the prompt states (`render_prompt`).
REASONS: Final = (
    "terminal with known fraud",
    "new terminal",
    "amount far above usual",
    "burst of tiny payments",
    "many payments in a short time",
    "risky merchant category",
    "abroad",
    "online",
    "odd hour",
    "first payment of the customer",
)
#: The verdict `explain` returns: the server holds the model's output to this schema
#: (structured output), so every explanation parses and lists known reasons only.
VERDICT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "risk": {"enum": ["low", "medium", "high"]},
        "reasons": {
            "type": "array",
            "items": {"enum": list(REASONS)},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["risk", "reasons"],
}


def explain(
    client: Client, prompt: str, row: ScoredRow, options: ScoreOptions, out: TextIO
) -> dict[str, Any] | None:
    """A JSON verdict on why ``row`` looks risky (`VERDICT_SCHEMA`), streamed to ``out`` as
    it is written; returns it parsed, or None when the token budget cut it short."""
    facts = prompt.removesuffix(PROMPT_QUESTION).strip()
    question = (
        f"{facts}\nA fraud model gave this card payment a risk score of {row.score:.2f}. "
        "Give the risk level and which of these facts make it look risky, as JSON."
    )
    out.write(f"[{row.transaction_id} score {row.score:.3f}] ")
    pieces: list[str] = []
    for chunk in client.stream(
        [ChatMessage("user", question)],
        model=options.model,
        max_new_tokens=options.explain_tokens,
        structured=Structured(json_schema=VERDICT_SCHEMA),
    ):
        pieces.append(chunk.text)
        out.write(chunk.text)
        out.flush()
    out.write("\n")
    try:
        verdict: dict[str, Any] = json.loads("".join(pieces))
    except ValueError:  # cut by --explain-tokens before the object closed
        return None
    return verdict


def score_file(
    path: str | Path,
    client: Client,
    options: ScoreOptions,
    *,
    out: TextIO,
    log: TextIO,
    explain_to: TextIO | None = None,
    fmt: OutputFormat = "csv",
) -> ScoreSummary:
    """Read, validate and score ``path``; write every row with ``OUTPUT_COLUMNS`` to ``out``
    as ``fmt`` (see ``slimserve.fraud.audit``).

    Every rejected field also goes to ``log`` as ``FILE:LINE: FIELD: message``, and every row
    without a decision as ``TRANSACTION_ID: message``.

    Raises:
        ValueError: the extension is neither CSV nor JSONL.
        OSError: the file cannot be read.
        ClientError: a failure that is not about one row.
    """
    start = time.perf_counter()
    read = read_transactions(path)
    for error in read.errors:
        log.write(f"{path}:{error.line_number}: {error.field}: {error.message}\n")
    scoring = time.perf_counter()
    outcomes = score_outcomes(client, read.rows, options, explain_to=explain_to)
    scoring_s = time.perf_counter() - scoring
    scored = [o for o in outcomes if isinstance(o, ScoredRow)]
    failed = [o for o in outcomes if isinstance(o, ScoreFailure)]
    for failure in failed:
        log.write(f"{failure.transaction_id}: {failure.message}\n")
    records = output_records(
        outcomes, read.errors, threshold=options.threshold, prompt_format=PROMPT_FORMAT
    )
    write_scores(out, records, fmt)
    return ScoreSummary(
        errors=tuple(read.errors),
        scored=tuple(scored),
        failed=tuple(failed),
        wall_s=time.perf_counter() - start,
        scoring_s=scoring_s,
    )


def _score_one(client: Client, prompt: str, model: str) -> ScoreResult | ClientError:
    delay = _OVERLOAD_BACKOFF_S
    for attempt in range(_OVERLOAD_RETRIES + 1):
        try:
            return client.score(prompt, SCORE_LABELS, model=model)
        except InvalidArgument as exc:
            return exc
        except Overloaded as exc:
            if attempt == _OVERLOAD_RETRIES:
                return exc
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def row_outcome(
    tx: Transaction, result: ScoreResult | ClientError, threshold: float
) -> ScoredRow | ScoreFailure:
    """What one row's Score call decided: a ``ScoredRow``, or a ``ScoreFailure`` when the
    server refused the row or answered with a score that is not a probability."""
    if isinstance(result, ClientError):
        return ScoreFailure(tx.transaction_id, str(result))
    try:
        score = fraud_probability(result)
    except NotAProbability as exc:
        return ScoreFailure(tx.transaction_id, str(exc), result.model, result.model_digest)
    return ScoredRow(
        transaction_id=tx.transaction_id,
        score=score,
        decision=decide(score, threshold),
        model_version=result.model,
        model_digest=result.model_digest,
        latency_ms=result.latency_ms,
    )
