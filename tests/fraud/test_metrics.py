from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slimserve.fraud import (
    SystemResult,
    average_precision,
    difference_table,
    evaluate,
    latency_summary,
    markdown_table,
    paired_auc_difference,
    precision_at_k,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    write_report,
)


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    labels = rng.integers(0, 2, size=n)
    labels[:2] = (0, 1)
    # Rounded scores make plenty of ties, the case implementations get wrong.
    scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), int(rng.integers(0, 3)))
    return labels, scores


@pytest.mark.parametrize("seed", range(20))
def test_ranking_metrics_match_scikit_learn(seed: int) -> None:
    from sklearn import metrics

    labels, scores = _random_case(seed)

    assert roc_auc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores))
    assert average_precision(labels, scores) == pytest.approx(
        metrics.average_precision_score(labels, scores)
    )
    for ours, theirs in zip(
        precision_recall_curve(labels, scores),
        metrics.precision_recall_curve(labels, scores),
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs)
    fpr, tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(roc_curve(labels, scores), (fpr, tpr))


def test_precision_at_k_counts_frauds_among_the_top_scores() -> None:
    labels = [0, 1, 1, 0, 1, 0]
    scores = [0.9, 0.8, 0.1, 0.7, 0.95, 0.2]

    assert precision_at_k(labels, scores, 1) == 1.0
    assert precision_at_k(labels, scores, 2) == 0.5
    assert precision_at_k(labels, scores, 4) == 0.5
    assert precision_at_k(labels, scores, 6) == 0.5
    with pytest.raises(ValueError, match="k=7"):
        precision_at_k(labels, scores, 7)


def test_latency_percentiles_match_numpy() -> None:
    latencies = np.random.default_rng(0).lognormal(2.0, 0.5, size=1001)
    summary = latency_summary(latencies)

    assert summary.count == 1001
    assert summary.p50_ms == pytest.approx(np.percentile(latencies, 50))
    assert summary.p90_ms == pytest.approx(np.percentile(latencies, 90))
    assert summary.p99_ms == pytest.approx(np.percentile(latencies, 99))
    assert summary.max_ms == pytest.approx(latencies.max())
    with pytest.raises(ValueError, match="no latencies"):
        latency_summary([])


def test_one_class_is_refused() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="equal length"):
        average_precision([0, 1], [0.1])


def test_the_report_writes_a_table_and_a_png(tmp_path: Path) -> None:
    labels, scores = _random_case(1)
    systems = [
        SystemResult(name="fraud-scorer@3", labels=labels, scores=scores, latencies_ms=[4, 5, 9]),
        SystemResult(name="baseline", labels=labels, scores=-scores),
    ]

    table, png = write_report(tmp_path / "out", systems, k=10)

    text = table.read_text()
    assert text == markdown_table([evaluate(s, k=10) for s in systems])
    assert "| fraud-scorer@3 |" in text
    assert "| baseline |" in text
    assert text.count("\n") == 4  # header, rule, two systems
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_weights_count_a_row_that_many_times() -> None:
    """A class-stratified sample, reweighted, gives the figures of the rows it stands for."""
    rng = np.random.default_rng(0)
    labels = np.array([1] * 8 + [0] * 30)
    scores = np.round(rng.normal(size=labels.size) + labels, 1)  # with ties
    weights = np.where(labels == 1, 1.0, 3.0)
    replicated_labels = np.concatenate([labels, np.zeros(60, dtype=np.int64)])
    replicated_scores = np.concatenate([scores, np.tile(scores[labels == 0], 2)])

    assert average_precision(labels, scores, np.ones(labels.size)) == pytest.approx(
        average_precision(labels, scores)
    )
    assert average_precision(labels, scores, weights) == pytest.approx(
        average_precision(replicated_labels, replicated_scores)
    )
    for k in (1, 7, 30, 98):
        weighted = precision_at_k(labels, scores, k, weights)
        # Replicated legit rows tie with their originals; the weighted cut may overshoot by
        # less than one row's weight, so compare with the replicated figure at that depth.
        order = np.argsort(-scores, kind="stable")
        taken = int(np.searchsorted(np.cumsum(weights[order]), k - 1e-9)) + 1
        depth = int(weights[order][:taken].sum())
        assert weighted == pytest.approx(
            precision_at_k(replicated_labels, replicated_scores, depth)
        )
    system = SystemResult(name="s", labels=labels, scores=scores, weights=weights)
    metrics = evaluate(system, k=200)
    assert metrics.k == 98 and metrics.count == 38 and metrics.frauds == 8
    assert metrics.pr_auc == pytest.approx(average_precision(replicated_labels, replicated_scores))
    with pytest.raises(ValueError, match="3 weights for 38 rows"):
        average_precision(labels, scores, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite and positive"):
        precision_at_k(labels, scores, 5, np.zeros(labels.size))


def _hanley_mcneil_se(auc: float, positives: int, negatives: int) -> float:
    """The textbook standard error of one ROC-AUC (Hanley & McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (
        auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)
    ) / (positives * negatives)
    return float(np.sqrt(variance))


def test_the_paired_bootstrap_interval_has_the_textbook_width() -> None:
    """Against a constant scorer (AUC exactly 0.5 on every resample) the gap's interval is
    the first system's own AUC interval, whose width the Hanley-McNeil formula predicts."""
    rng = np.random.default_rng(3)
    labels = np.array([1] * 150 + [0] * 850)
    scores = rng.normal(size=labels.size) + 1.5 * labels
    constant = np.zeros(labels.size)

    gap = paired_auc_difference(labels, scores, constant, names=("model", "flat"), seed=1)

    auc = roc_auc(labels, scores)
    assert gap.difference == pytest.approx(auc - 0.5)
    assert gap.low < gap.difference < gap.high
    expected = 1.96 * _hanley_mcneil_se(auc, 150, 850)
    assert (gap.high - gap.low) / 2 == pytest.approx(expected, rel=0.2)
    assert gap.verdict == "above"
    assert paired_auc_difference(labels, constant, scores).verdict == "below"
    again = paired_auc_difference(labels, scores, constant, names=("model", "flat"), seed=1)
    assert again == gap  # seeded: a report reruns to the same interval


def test_a_paired_gap_is_level_when_two_scorers_differ_by_noise() -> None:
    rng = np.random.default_rng(5)
    labels = np.array([1] * 40 + [0] * 400)
    signal = rng.normal(size=labels.size) + labels
    a = signal + rng.normal(scale=0.05, size=labels.size)
    b = signal + rng.normal(scale=0.05, size=labels.size)

    same = paired_auc_difference(labels, a, a)
    close = paired_auc_difference(labels, a, b, names=("a", "b"))

    assert (same.difference, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, "level")
    assert close.verdict == "level" and close.low < 0 < close.high
    # Pairing is what makes the interval narrow: both systems see the same resampled rows,
    # so the gap varies far less than either AUC alone.
    assert close.high - close.low < 0.25 * 2 * 1.96 * _hanley_mcneil_se(roc_auc(labels, a), 40, 400)
    table = difference_table([close])
    assert "| a | " in table and "| level |" in table and "2000 resamples" in table
    with pytest.raises(ValueError, match="equal length"):
        paired_auc_difference(labels, a, b[:-1])
    with pytest.raises(ValueError, match="resamples"):
        paired_auc_difference(labels, a, b, resamples=0)
