"""The fraud scorer and the report against a real tiny gRPC server (the commands are in
test_commands.py).

The tiny model is untrained, so its scores are arbitrary; what is checked is the plumbing:
one probability per valid row, bad rows reported by line number and counted, exact output
columns (each score beside the digest the server answered with, the threshold and the prompt
format; each rejected row with its reason), the report's table and curves, and clear errors
for models the server lacks.
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from slimserve.clients import Client, FailedPrecondition, NotFound
from slimserve.fraud import PROMPT_FORMAT, read_transactions, write_transactions
from slimserve.fraud.audit import DECISION_REJECTED
from slimserve.fraud.report import BASELINE_NAME, ReportConfig, run_report
from slimserve.fraud.scorer import (
    DECISION_FRAUD,
    DECISION_LEGIT,
    OUTPUT_COLUMNS,
    SCORE_LABELS,
    ScoreOptions,
    score_file,
    score_rows,
    stream_prompts,
    time_sorted,
)
from slimserve.fraud.simulate import simulate
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_score_file_scores_every_valid_row_and_reports_bad_lines(
    fraud_server: ServerThread, payments: Path
) -> None:
    valid = read_transactions(payments).rows
    out, log = io.StringIO(), io.StringIO()

    with Client(fraud_server.target) as client:
        summary = score_file(
            payments, client, ScoreOptions(model="tiny", concurrency=4), out=out, log=log
        )
        digest = client.model_info("tiny").digest
        answered = client.score(stream_prompts(valid[:1])[0], SCORE_LABELS, model="tiny")

    table = list(csv.reader(io.StringIO(out.getvalue())))
    assert tuple(table[0]) == OUTPUT_COLUMNS
    scored, rejected = table[1 : len(valid) + 1], table[len(valid) + 1 :]
    assert [r[0] for r in scored] == [tx.transaction_id for tx in valid]  # file order
    for row in scored:
        assert 0.0 <= float(row[1]) <= 1.0
        assert row[2] == (DECISION_FRAUD if float(row[1]) >= 0.5 else DECISION_LEGIT)
        assert row[3] == "tiny@1"
        assert float(row[4]) > 0
        # The digest the server answered with, the rule and the prompt format used.
        assert row[5:] == [digest, "0.5", str(PROMPT_FORMAT), ""]
    assert answered.model_digest == digest
    first_bad = len(valid) + 2  # header is line 1
    # Every rejected line is listed with its reason, never dropped.
    assert [(r[0], r[1], r[2], r[8]) for r in rejected] == [
        ("bad-amount", "", DECISION_REJECTED, f"line {first_bad}: amount: not a number: 'abc'"),
        ("bad-time", "", DECISION_REJECTED, rejected[1][8]),
        ("bad-channel", "", DECISION_REJECTED, rejected[2][8]),
    ]
    assert rejected[1][8].startswith(f"line {first_bad + 1}: timestamp:")
    assert rejected[2][8].startswith(f"line {first_bad + 2}: channel:")
    assert all(r[6:8] == ["0.5", str(PROMPT_FORMAT)] for r in rejected)
    messages = log.getvalue().splitlines()
    assert f"{payments}:{first_bad}: amount: not a number: 'abc'" in messages
    assert any(m.startswith(f"{payments}:{first_bad + 1}: timestamp:") for m in messages)
    assert any(m.startswith(f"{payments}:{first_bad + 2}: channel:") for m in messages)
    assert summary.rejected == 3 and not summary.failed
    assert len(summary.scored) == len(valid)
    assert "rejected 3 lines" in summary.describe()
    # Latency percentiles of the scored rows' round trips, and the rate while scoring.
    assert summary.latency is not None and summary.latency.count == len(valid)
    assert 0 < summary.scoring_s <= summary.wall_s
    assert f"p50 {summary.latency.p50_ms:.1f} ms" in summary.describe()


def test_scores_do_not_depend_on_concurrency_or_file_order(
    fraud_server: ServerThread, payments: Path
) -> None:
    rows = read_transactions(payments).rows[:40]
    with Client(fraud_server.target) as client:
        serial, _ = score_rows(client, rows, ScoreOptions(model="tiny"))
        shuffled, _ = score_rows(client, rows[::-1], ScoreOptions(model="tiny", concurrency=8))

    by_id = {r.transaction_id: r.score for r in shuffled}
    # Sorted by time before the features are built, so the reversed file scores the same.
    # Concurrent Scores share a batched forward; its size changes float rounding (~1e-6).
    assert [by_id[r.transaction_id] for r in serial] == pytest.approx(
        [r.score for r in serial], rel=1e-4
    )


def test_prompts_too_long_for_the_server_are_refused_row_by_row(
    tiny_registry: Path, payments: Path
) -> None:
    from slimserve.server.config import Limits

    rows = read_transactions(payments).rows[:40]
    ordered = time_sorted(rows)
    prompts = dict(zip((r.transaction_id for r in ordered), stream_prompts(ordered), strict=True))
    tokenizer = tiny_tokenizer()  # the tiny model's own
    length = {k: len(tokenizer.encode(p)) for k, p in prompts.items()}
    # A server whose prompt limit falls inside the spread of these prompts' lengths.
    limit = sorted(length.values())[len(length) // 2]
    server = ServerThread(tiny_server_config(tiny_registry, limits=Limits(max_prompt_tokens=limit)))
    try:
        with Client(server.start().target) as client:
            scored, failed = score_rows(client, rows, ScoreOptions(model="tiny", concurrency=2))
    finally:
        server.stop()

    assert scored and failed
    assert {r.transaction_id for r in scored} | {f.transaction_id for f in failed} == set(prompts)
    assert all("INVALID_ARGUMENT" in f.message for f in failed)
    # Refused because too long, and only then: every refused prompt outgrows every scored one.
    assert min(length[f.transaction_id] for f in failed) > max(
        length[r.transaction_id] for r in scored
    )


def test_a_model_the_server_lacks_ends_the_run(fraud_server: ServerThread, payments: Path) -> None:
    rows = read_transactions(payments).rows[:3]
    with Client(fraud_server.target) as client, pytest.raises(NotFound):
        score_rows(client, rows, ScoreOptions(model="fraud-scorer@production"))


def test_a_model_trained_on_another_prompt_format_is_refused(
    fraud_server: ServerThread, payments: Path
) -> None:
    rows = read_transactions(payments).rows[:3]
    with Client(fraud_server.target) as client:
        with pytest.raises(FailedPrecondition, match=f"prompt format {PROMPT_FORMAT - 1}"):
            score_rows(client, rows, ScoreOptions(model="tiny-old"))
        scored, failed = score_rows(client, rows, ScoreOptions(model="tiny-b"))
    assert len(scored) == 3 and not failed


def test_report_writes_table_and_curves_with_the_baseline(
    fraud_server: ServerThread, payments: Path, tmp_path: Path
) -> None:
    train = tmp_path / "train.csv"
    write_transactions(train, simulate(40, 7, seed=8))
    config = ReportConfig(
        data=payments,
        models=("tiny@1", "tiny-b"),
        target=fraud_server.target,
        baseline_train=train,
        out=tmp_path / "report",
        concurrency=4,
        throughput_rows=16,
        k=20,
    )

    report = run_report(config, Client)

    names = [m.name for m in report.metrics]
    assert names == ["tiny@1", "tiny-b (tiny-b@1)", BASELINE_NAME]
    assert all(0.0 <= m.roc_auc <= 1.0 and m.k == 20 for m in report.metrics)
    assert [(t.name, t.concurrency, t.requests) for t in report.throughput] == [
        ("tiny@1", 1, report.metrics[0].count),
        ("tiny@1", 4, 16),
        ("tiny-b (tiny-b@1)", 1, report.metrics[0].count),
        ("tiny-b (tiny-b@1)", 4, 16),
    ]
    table = report.markdown.read_text()
    assert table == report.table
    assert f"| {BASELINE_NAME} |" in table and "| tiny@1 | 4 | 16 |" in table
    assert "3 lines of payments.csv were rejected" in table
    assert report.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each model against the baseline, paired on the same rows.
    assert [(d.a, d.b) for d in report.against_baseline] == [
        (names[0], BASELINE_NAME),
        (names[1], BASELINE_NAME),
    ]
    for gap, model in zip(report.against_baseline, report.metrics, strict=False):
        assert gap.difference == pytest.approx(model.roc_auc - report.metrics[-1].roc_auc)
        assert gap.low <= gap.high
        assert f"| {gap.a} | {gap.difference:+.4f} |" in table
    # Every scored row, with each system's score, to recompute the figures from.
    with (report.markdown.parent / "scores.csv").open(newline="") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == report.metrics[0].count
    for system in report.systems:
        assert [float(r[system.name]) for r in written] == pytest.approx(list(system.scores))
    assert [int(r["is_fraud"]) for r in written] == list(report.systems[0].labels)


def test_report_names_every_model_the_server_lacks(
    fraud_server: ServerThread, payments: Path, tmp_path: Path
) -> None:
    config = ReportConfig(
        data=payments, models=("tiny@2", "tiny", "other"), target=fraud_server.target
    )

    with pytest.raises(NotFound) as caught:
        run_report(config, Client)

    message = str(caught.value)
    assert "tiny@2 is not served at" in message and "other is not served at" in message
    assert "--route" in message


def test_report_refuses_a_model_trained_on_another_prompt_format(
    fraud_server: ServerThread, payments: Path, tmp_path: Path
) -> None:
    config = ReportConfig(
        data=payments, models=("tiny-b", "tiny-old"), target=fraud_server.target, out=tmp_path
    )

    with pytest.raises(FailedPrecondition, match=f"prompt format {PROMPT_FORMAT - 1}"):
        run_report(config, Client)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_stratified_report_keeps_the_frauds_and_reweights_the_rest(
    fraud_server: ServerThread, payments: Path, tmp_path: Path
) -> None:
    rows = read_transactions(payments).rows
    frauds = sum(1 for r in rows if r.is_fraud)
    legit = len(rows) - frauds
    assert frauds >= 3
    config = ReportConfig(
        data=payments,
        models=("tiny",),
        target=fraud_server.target,
        out=tmp_path / "report",
        limit=30,
        frauds=3,
        throughput_rows=4,
        concurrency=2,
    )

    report = run_report(config, Client)

    (metrics,) = report.metrics
    assert (metrics.count, metrics.frauds) == (30, 3)
    weight = (legit / 27) * (3 / frauds)
    (system,) = report.systems
    assert sorted(set(np.asarray(system.weights).tolist())) == sorted({1.0, weight})
    assert f"each legitimate payment stands for {weight:.2f}" in report.table
    with pytest.raises(ValueError, match="it needs --limit"):
        replace(config, limit=0)
