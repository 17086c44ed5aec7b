"""Ranking metrics, latency percentiles, and a side-by-side report of several scorers.

Labels are 0/1 (1 = fraud); scores are any real numbers where higher means more likely
fraud. Tied scores are handled as scikit-learn does: ROC-AUC gives a tie half credit, and
the curves step once per distinct score. Latencies are in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random

import numpy as np
import numpy.typing as npt

_Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Latency percentiles in milliseconds (linear interpolation, as ``numpy.percentile``)."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemResult:
    """One scorer's output on a labelled set: a row of the report."""

    name: str
    labels: npt.ArrayLike  # (n,) 0/1
    scores: npt.ArrayLike  # (n,) higher = more likely fraud
    latencies_ms: npt.ArrayLike = ()  # any count; empty when not timed
    # (n,) how many payments of the file each row stands for; empty = 1 each. A class-
    # stratified sample weights its legitimate rows so PR-AUC and precision@k are the file's.
    weights: npt.ArrayLike = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemMetrics:
    """The figures of one ``SystemResult``; ``latency`` is None without latencies."""

    name: str
    count: int
    frauds: int
    roc_auc: float
    pr_auc: float
    precision_at_k: float
    k: int
    latency: LatencySummary | None


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve: the chance a random fraud outscores a random legit payment.

    Raises:
        ValueError: lengths differ, or only one class is present.
    """
    y, s = _check(labels, scores)
    return _auc_of_ranks(_average_ranks(s), y == 1)


def average_precision(
    labels: npt.ArrayLike, scores: npt.ArrayLike, weights: npt.ArrayLike | None = None
) -> float:
    """PR-AUC as average precision: sum over thresholds of (recall step) x precision.

    ``weights`` (one per row, as scikit-learn's ``sample_weight``) count each row that many
    times.

    Raises:
        ValueError: lengths differ, or only one class is present.
    """
    precision, recall, _ = precision_recall_curve(labels, scores, weights)
    # recall decreases along the curve, so each step is negative.
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def precision_at_k(
    labels: npt.ArrayLike, scores: npt.ArrayLike, k: int, weights: npt.ArrayLike | None = None
) -> float:
    """Share of frauds among the ``k`` highest scores (ties keep input order).

    With ``weights``, the top rows are taken until they stand for ``k`` payments (the last
    one may overshoot) and the share is weighted.

    Raises:
        ValueError: ``k`` outside 1..n (or above the total weight), or lengths differ.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    w = _weights(weights, y.size)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores; give one score per label")
    payments = y.size if weights is None else float(w.sum())
    if not 1 <= k <= payments:
        raise ValueError(f"k={k} must be between 1 and the number of scores ({payments:g})")
    order = np.argsort(-s, kind="stable")
    taken = int(np.searchsorted(np.cumsum(w[order]), k - 1e-9)) + 1
    top = order[:taken]
    return float((w[top] * y[top]).sum() / w[top].sum())


def roc_curve(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[_Array, _Array]:
    """False- and true-positive rates, from (0, 0) to (1, 1), one point per distinct score.

    Unweighted: weights that are constant within each class leave every rate unchanged.
    """
    y, s = _check(labels, scores)
    true_pos, false_pos, _ = _cumulative(y, s, np.ones(y.size))
    tpr = np.concatenate([[0.0], true_pos / true_pos[-1]])
    fpr = np.concatenate([[0.0], false_pos / false_pos[-1]])
    return fpr, tpr


def precision_recall_curve(
    labels: npt.ArrayLike, scores: npt.ArrayLike, weights: npt.ArrayLike | None = None
) -> tuple[_Array, _Array, _Array]:
    """Precision, recall and thresholds, as scikit-learn orders them (recall decreasing).

    The last point is (precision 1, recall 0) and has no threshold. ``weights``: as in
    ``average_precision``.
    """
    y, s = _check(labels, scores)
    true_pos, false_pos, thresholds = _cumulative(y, s, _weights(weights, y.size))
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / true_pos[-1]
    return (
        np.concatenate([precision[::-1], [1.0]]),
        np.concatenate([recall[::-1], [0.0]]),
        thresholds[::-1],
    )


@dataclass(frozen=True, slots=True)
class AucDifference:
    """ROC-AUC of system ``a`` minus system ``b`` on the same rows, with a bootstrap interval."""

    a: str
    b: str
    difference: float  # on the rows as given
    low: float  # percentile interval of the resampled differences
    high: float
    confidence: float
    resamples: int

    @property
    def verdict(self) -> str:
        """``above``/``below`` when the interval excludes 0, else ``level``."""
        if self.low > 0:
            return "above"
        if self.high < 0:
            return "below"
        return "level"


def paired_auc_difference(
    labels: npt.ArrayLike,
    scores_a: npt.ArrayLike,
    scores_b: npt.ArrayLike,
    *,
    names: tuple[str, str] = ("a", "b"),
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> AucDifference:
    """ROC-AUC(a) - ROC-AUC(b), and its percentile interval from a paired, class-stratified
    bootstrap: each resample draws the frauds and the legitimate rows with replacement,
    keeping both classes' counts, and scores both systems on the same draw, so the interval
    reflects how much the gap depends on which payments happened to be in the file.

    scikit-learn has no paired test of two AUCs and DeLong's needs a hand-written variance
    too; the bootstrap is a dozen lines of numpy and makes no normality assumption.

    Raises:
        ValueError: lengths differ, one class only, ``resamples`` < 1 or ``confidence``
            outside (0, 1).
    """
    y, a = _check(labels, scores_a)
    _, b = _check(labels, scores_b)
    if resamples < 1:
        raise ValueError(f"resamples {resamples} must be >= 1, e.g. 2000")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1), e.g. 0.95")
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    differences = np.empty(resamples)
    # A resample puts its frauds first; the inputs were checked once above, not per resample.
    is_fraud = np.arange(pos.size + neg.size) < pos.size
    for i in range(resamples):
        rows = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        differences[i] = _auc_of_ranks(_average_ranks(a[rows]), is_fraud) - _auc_of_ranks(
            _average_ranks(b[rows]), is_fraud
        )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return AucDifference(
        a=names[0],
        b=names[1],
        difference=roc_auc(y, a) - roc_auc(y, b),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
    )


def difference_table(rows: Sequence[AucDifference]) -> str:
    """Each comparison as a markdown table row: the gap, its interval and the verdict."""
    if not rows:
        return ""
    first = rows[0]
    lines = [
        f"ROC-AUC against {first.b}: paired, class-stratified bootstrap, {first.resamples} "
        f"resamples, {first.confidence:.0%} interval (level = the interval holds 0).",
        "",
        "| system | ROC-AUC difference | interval | verdict |",
        "|---|---:|---:|---|",
    ]
    lines += [
        f"| {d.a} | {d.difference:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] | {d.verdict} |"
        for d in rows
    ]
    return "\n".join(lines) + "\n"


def latency_summary(latencies_ms: npt.ArrayLike) -> LatencySummary:
    """Count, mean, p50, p90, p99 and max of latencies in milliseconds.

    Raises:
        ValueError: no latencies.
    """
    values = np.asarray(latencies_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no latencies to summarise; time at least one request")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return LatencySummary(
        count=int(values.size),
        mean_ms=float(values.mean()),
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        max_ms=float(values.max()),
    )


def evaluate(system: SystemResult, k: int = 100) -> SystemMetrics:
    """All figures of one system; ``k`` is capped at the number of scores."""
    labels = np.asarray(system.labels, dtype=np.int64)
    latencies = np.asarray(system.latencies_ms, dtype=np.float64)
    weights = _system_weights(system)
    k = min(k, labels.size if weights is None else int(np.sum(weights)))
    return SystemMetrics(
        name=system.name,
        count=int(labels.size),
        frauds=int(labels.sum()),
        roc_auc=roc_auc(labels, system.scores),
        pr_auc=average_precision(labels, system.scores, weights),
        precision_at_k=precision_at_k(labels, system.scores, k, weights),
        k=k,
        latency=latency_summary(latencies) if latencies.size else None,
    )


def markdown_table(rows: Sequence[SystemMetrics]) -> str:
    """The systems side by side as a GitHub markdown table (one row per system)."""
    header = (
        "| system | payments | frauds | ROC-AUC | PR-AUC | precision@k | "
        "p50 ms | p90 ms | p99 ms |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for m in rows:
        lat = m.latency
        times = (
            "| - | - | -"
            if lat is None
            else f"| {lat.p50_ms:.2f} | {lat.p90_ms:.2f} | {lat.p99_ms:.2f}"
        )
        lines.append(
            f"| {m.name} | {m.count} | {m.frauds} | {m.roc_auc:.4f} | {m.pr_auc:.4f} "
            f"| {m.precision_at_k:.3f} (k={m.k}) {times} |"
        )
    return header + "\n".join(lines) + "\n"


def stratified_sample(
    positives: Sequence[int], negatives: Sequence[int], frauds: int, legit: int, rng: Random
) -> tuple[list[int], float]:
    """Up to ``frauds`` positives and ``legit`` negatives drawn with ``rng``, sorted, and the
    weight of a drawn negative so the sample's class mix is the population's (positives left
    out count too). Both lists must be non-empty."""
    picked_pos = rng.sample(list(positives), min(frauds, len(positives)))
    picked_neg = rng.sample(list(negatives), min(legit, len(negatives)))
    weight = (len(negatives) / len(picked_neg)) * (len(picked_pos) / len(positives))
    return sorted(picked_pos + picked_neg), weight


def weighting_note(legit_weight: float) -> str:
    """The line under a table of a class-stratified sample."""
    return (
        f"\nClass-stratified sample: each legitimate payment stands for {legit_weight:.2f} of "
        "the file's, so PR-AUC and precision@k are at the file's fraud rate; ROC-AUC does not "
        "depend on the class mix.\n"
    )


def plot_curves(path: str | Path, systems: Sequence[SystemResult]) -> Path:
    """Write a PNG with ROC (left) and precision-recall (right) curves of every system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (roc_axes, pr_axes) = plt.subplots(1, 2, figsize=(11, 4.8))
    try:
        for system in systems:
            fpr, tpr = roc_curve(system.labels, system.scores)
            roc_axes.plot(
                fpr, tpr, label=f"{system.name} ({roc_auc(system.labels, system.scores):.3f})"
            )
            weights = _system_weights(system)
            precision, recall, _ = precision_recall_curve(system.labels, system.scores, weights)
            ap = average_precision(system.labels, system.scores, weights)
            pr_axes.step(recall, precision, where="post", label=f"{system.name} ({ap:.3f})")
        roc_axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        roc_axes.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        pr_axes.set(xlabel="recall", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
        for axes in (roc_axes, pr_axes):
            axes.legend(loc="lower right" if axes is roc_axes else "upper right", fontsize=8)
            axes.grid(alpha=0.3)
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)
    return path


def write_report(
    directory: str | Path, systems: Sequence[SystemResult], *, k: int = 100, stem: str = "report"
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (the table) and ``<stem>.png`` (the curves) into ``directory``.

    Returns:
        The paths of the markdown file and the PNG.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = directory / f"{stem}.md"
    table.write_text(markdown_table([evaluate(s, k) for s in systems]), encoding="utf-8")
    return table, plot_curves(directory / f"{stem}.png", systems)


def _check(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], _Array]:
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of equal length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    positives = int(y.sum())
    if positives in (0, y.size):
        raise ValueError("both classes are needed; the labels hold only one")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def _auc_of_ranks(ranks: _Array, is_fraud: npt.NDArray[np.bool_]) -> float:
    """ROC-AUC from 1-based average ranks (Mann-Whitney U over positives x negatives)."""
    positives = int(is_fraud.sum())
    negatives = is_fraud.size - positives
    rank_sum = float(ranks[is_fraud].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _average_ranks(values: _Array) -> _Array:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    ends = np.concatenate([starts[1:], [values.size]])
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def _cumulative(y: npt.NDArray[np.int64], s: _Array, w: _Array) -> tuple[_Array, _Array, _Array]:
    """(Weighted) true and false positives at each distinct threshold, highest score first."""
    order = np.argsort(-s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    last_of_run = np.flatnonzero(np.concatenate([s[1:] != s[:-1], [True]]))
    true_pos = np.cumsum(w * y)[last_of_run]
    false_pos = np.cumsum(w * (1 - y))[last_of_run]
    return true_pos, false_pos, s[last_of_run]


def _weights(weights: npt.ArrayLike | None, n: int) -> _Array:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{w.size} weights for {n} rows; give one weight per row")
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError("weights must be finite and positive")
    return w


def _system_weights(system: SystemResult) -> _Array | None:
    w = np.asarray(system.weights, dtype=np.float64)
    return w if w.size else None
