"""Compare served model versions and the classical baseline on one labelled file.

For every model reference (``fraud-scorer@1``, ``fraud-scorer@production``, ...) the file is
scored through the server that holds it (``Score``, one call per payment): first one call at
a time, which gives the quality figures (ROC-AUC, PR-AUC, precision among the top ``k``
scores) and the latency percentiles, then ``concurrency`` calls at a time over the first
``throughput_rows`` payments, which gives the throughput under load. The baseline (gradient-
boosted trees on the same streaming features) is trained on another labelled file and scored
on the same rows in-process.

A server holds one version per model name, so comparing versions of one name needs one
server per version: ``routes`` sends a reference to its own address. A reference no server
holds is reported before any scoring, as ``NotFound`` with what the server does hold.

The report is ``<out>/report.md`` (the ``metrics.markdown_table`` of every system, each model's
ROC-AUC gap to the baseline with a paired bootstrap interval, then a throughput table),
``<out>/report.png`` (ROC and precision-recall curves) and ``<out>/scores.csv`` (every
scored row's label, weight and each system's score, to recompute any figure).
"""

from __future__ import annotations

import csv
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import numpy as np

from slimserve.clients import Client, ClientError, NotFound
from slimserve.fraud.baseline import predict_features, train_baseline
from slimserve.fraud.features import FeatureConfig, build_features
from slimserve.fraud.metrics import (
    AucDifference,
    LatencySummary,
    SystemMetrics,
    SystemResult,
    difference_table,
    evaluate,
    latency_summary,
    markdown_table,
    paired_auc_difference,
    plot_curves,
    stratified_sample,
    weighting_note,
)
from slimserve.fraud.schema import RowError, Transaction, read_transactions
from slimserve.fraud.scorer import (
    check_prompt_format,
    fraud_probability,
    score_prompts,
    stream_prompts,
    time_sorted,
)

BASELINE_NAME: Final = "baseline (GBT)"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportConfig:
    """What to compare and where: ``routes`` maps a model reference to its server address
    (others use ``target``); ``limit`` (0 = all) scores a seeded uniform sample of rows, or
    with ``frauds`` a class-stratified one: up to ``frauds`` frauds and the rest legitimate
    payments, each legitimate one weighted so PR-AUC and precision@k are the file's."""

    data: Path
    models: tuple[str, ...]
    target: str
    routes: Mapping[str, str] = field(default_factory=dict)
    baseline_train: Path | None = None
    out: Path = Path("fraud-report")
    limit: int = 0
    frauds: int = 0
    seed: int = 0
    k: int = 100
    concurrency: int = 16
    throughput_rows: int = 256
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if not self.models and self.baseline_train is None:
            raise ValueError("nothing to compare: give --models and/or --baseline-train")
        if self.limit < 0:
            raise ValueError(f"limit {self.limit} must be >= 0 (0 = every row)")
        if self.frauds < 0 or (self.frauds and not 0 < self.frauds < self.limit):
            raise ValueError(
                f"frauds {self.frauds} must be 0 (a uniform sample) or between 1 and "
                f"limit - 1 ({self.limit - 1}); it needs --limit"
            )
        if self.k < 1:
            raise ValueError(f"k {self.k} must be >= 1, e.g. 100")
        if self.concurrency < 1 or self.throughput_rows < 1:
            raise ValueError(
                f"concurrency {self.concurrency} and throughput_rows {self.throughput_rows} "
                "must be >= 1"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Throughput:
    """Requests per second of one model at one concurrency, and their latencies."""

    name: str
    concurrency: int
    requests: int
    seconds: float
    latency: LatencySummary

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    systems: tuple[SystemResult, ...]
    metrics: tuple[SystemMetrics, ...]
    throughput: tuple[Throughput, ...]
    errors: tuple[RowError, ...]  # rejected lines of the data file
    against_baseline: tuple[AucDifference, ...]  # each model minus the baseline; () without one
    table: str  # the markdown written to ``markdown``
    markdown: Path
    png: Path


def run_report(
    config: ReportConfig,
    connect: Callable[[str], Client],
    *,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Score, measure and write the report (see the module docstring).

    ``connect(address)`` opens a client; each is closed when its model is done.

    Raises:
        NotFound: a model reference is not loaded where it is routed.
        NotAProbability: a model returned a NaN, infinite or out-of-range score.
        ValueError: the file has no labelled rows, or only one class among the chosen rows.
        ClientError: any other server failure.
    """
    say = progress or (lambda _: None)
    read = read_transactions(config.data)
    rows = time_sorted(read.rows)
    chosen, legit_weight = _choose(rows, config)
    labels = [rows[i].is_fraud or 0 for i in chosen]
    weights = [] if legit_weight is None else [1.0 if y else legit_weight for y in labels]
    if len(set(labels)) < 2:
        raise ValueError(f"the {len(chosen)} chosen rows hold one class only; use more rows")
    refs = _check_served(config, connect)
    prompts = stream_prompts(rows, config.features)
    chosen_prompts = [prompts[i] for i in chosen]
    systems: list[SystemResult] = []
    throughput: list[Throughput] = []
    for model, ref in refs.items():
        name = ref if model == ref else f"{model} ({ref})"
        with connect(config.routes.get(model, config.target)) as client:
            say(f"{name}: scoring {len(chosen)} rows, one call at a time")
            system, serial = _score_serially(client, model, name, chosen_prompts, labels)
            system = replace(system, weights=weights)
            say(f"{name}: {config.concurrency} concurrent calls over {config.throughput_rows}")
            loaded = _measure_throughput(
                client, model, name, chosen_prompts[: config.throughput_rows], config.concurrency
            )
        systems.append(system)
        throughput.extend([serial, loaded])
    if config.baseline_train is not None:
        say(f"{BASELINE_NAME}: training on {config.baseline_train}")
        baseline = _baseline(config.baseline_train, config, rows, chosen, labels)
        systems.append(replace(baseline, weights=weights))
    ids = [rows[i].transaction_id for i in chosen]
    return _write(config, systems, throughput, read.errors, legit_weight, ids=ids)


def throughput_table(rows: Sequence[Throughput]) -> str:
    """Throughput and latency per model and concurrency, as a markdown table."""
    lines = [
        "| system | concurrency | requests | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {t.name} | {t.concurrency} | {t.requests} | {t.per_s:.1f} | "
        f"{t.latency.p50_ms:.1f} | {t.latency.p99_ms:.1f} |"
        for t in rows
    ]
    return "\n".join(lines) + "\n"


def _choose(rows: Sequence[Transaction], config: ReportConfig) -> tuple[list[int], float | None]:
    """Indices of the labelled rows to score, in order: all, a seeded uniform sample, or a
    class-stratified one; and the weight of a sampled legitimate row (None: unweighted)."""
    labelled = [i for i, tx in enumerate(rows) if tx.is_fraud is not None]
    if not labelled:
        raise ValueError("the file has no labelled rows (is_fraud); a report needs labels")
    if not config.limit or config.limit >= len(labelled):
        return labelled, None
    rng = random.Random(config.seed)
    if not config.frauds:
        return sorted(rng.sample(labelled, config.limit)), None
    pos = [i for i in labelled if rows[i].is_fraud]
    neg = [i for i in labelled if not rows[i].is_fraud]
    if not pos or not neg:
        return pos + neg, None  # one class: the caller refuses it
    return stratified_sample(
        pos, neg, config.frauds, config.limit - min(config.frauds, len(pos)), rng
    )


def _check_served(config: ReportConfig, connect: Callable[[str], Client]) -> dict[str, str]:
    """Each model reference → the ``name@version`` serving it; all misses in one NotFound.

    A model trained on another prompt format is refused (``FailedPrecondition``) before
    anything is scored: its figures would be noise presented as a measurement.
    """
    refs: dict[str, str] = {}
    missing: list[str] = []
    for model in config.models:
        address = config.routes.get(model, config.target)
        with connect(address) as client:
            try:
                info = client.model_info(model)
            except NotFound as exc:
                missing.append(f"{model} is not served at {address}: {exc.details}")
                continue
            check_prompt_format(info)
            refs[model] = info.ref
    if missing:
        hint = (
            "start a server with `slimserve serve --model NAME@VERSION` for each one and "
            "pass --route NAME@VERSION=HOST:PORT"
        )
        raise NotFound("NOT_FOUND", "; ".join(missing) + f". To compare them, {hint}")
    return refs


def _score_serially(
    client: Client, model: str, name: str, prompts: Sequence[str], labels: Sequence[int]
) -> tuple[SystemResult, Throughput]:
    start = time.perf_counter()
    results = score_prompts(client, prompts, model, concurrency=1)
    seconds = time.perf_counter() - start
    scores, latencies = [], []
    for result in results:
        if isinstance(result, ClientError):
            raise result  # a report needs every row scored
        scores.append(fraud_probability(result))  # NaN would skew every figure silently
        latencies.append(result.latency_ms)
    system = SystemResult(name=name, labels=labels, scores=scores, latencies_ms=latencies)
    serial = Throughput(
        name=name,
        concurrency=1,
        requests=len(prompts),
        seconds=seconds,
        latency=latency_summary(latencies),
    )
    return system, serial


def _measure_throughput(
    client: Client, model: str, name: str, prompts: Sequence[str], concurrency: int
) -> Throughput:
    start = time.perf_counter()
    results = score_prompts(client, prompts, model, concurrency=concurrency)
    seconds = time.perf_counter() - start
    latencies = []
    for result in results:
        if isinstance(result, ClientError):
            raise result
        latencies.append(result.latency_ms)
    return Throughput(
        name=name,
        concurrency=concurrency,
        requests=len(prompts),
        seconds=seconds,
        latency=latency_summary(latencies),
    )


def _baseline(
    train_path: Path,
    config: ReportConfig,
    rows: Sequence[Transaction],
    chosen: Sequence[int],
    labels: Sequence[int],
) -> SystemResult:
    """The baseline scored in-process on the same rows; it has no served latency."""
    train = read_transactions(train_path)
    labelled = [tx for tx in time_sorted(train.rows) if tx.is_fraud is not None]
    model = train_baseline(labelled, config=config.features, seed=config.seed)
    features = build_features(rows, config.features)
    scores = predict_features(model, [features[i] for i in chosen])
    return SystemResult(name=BASELINE_NAME, labels=labels, scores=scores)


def _write(
    config: ReportConfig,
    systems: Sequence[SystemResult],
    throughput: Sequence[Throughput],
    errors: Sequence[RowError],
    legit_weight: float | None,
    *,
    ids: Sequence[str],
) -> Report:
    config.out.mkdir(parents=True, exist_ok=True)
    metrics = [evaluate(s, config.k) for s in systems]
    table = markdown_table(metrics)
    if legit_weight is not None:
        table += weighting_note(legit_weight)
    against = _against_baseline(systems, config.seed)
    if against:
        table += "\n" + difference_table(against)
    if throughput:
        table += "\n" + throughput_table(throughput)
    if errors:
        lines = len({e.line_number for e in errors})
        table += f"\n{lines} lines of {config.data.name} were rejected and not scored.\n"
    markdown = config.out / "report.md"
    markdown.write_text(table, encoding="utf-8")
    png = plot_curves(config.out / "report.png", systems)
    _write_scores(config.out / "scores.csv", systems, ids)
    return Report(
        systems=tuple(systems),
        metrics=tuple(metrics),
        throughput=tuple(throughput),
        errors=tuple(errors),
        against_baseline=tuple(against),
        table=table,
        markdown=markdown,
        png=png,
    )


def _against_baseline(systems: Sequence[SystemResult], seed: int) -> list[AucDifference]:
    """Each model's ROC-AUC minus the baseline's, paired on the same rows."""
    baseline = next((s for s in systems if s.name == BASELINE_NAME), None)
    if baseline is None:
        return []
    return [
        paired_auc_difference(
            s.labels, s.scores, baseline.scores, names=(s.name, BASELINE_NAME), seed=seed
        )
        for s in systems
        if s is not baseline
    ]


def _write_scores(path: Path, systems: Sequence[SystemResult], ids: Sequence[str]) -> None:
    """Every scored row: its id, label, sample weight and each system's score, so any figure
    of the report can be recomputed (or another test run) without scoring again."""
    labels = np.asarray(systems[0].labels, dtype=np.int64)
    weights = np.asarray(systems[0].weights, dtype=np.float64)
    if not weights.size:
        weights = np.ones(labels.size)
    scores = np.column_stack([np.asarray(s.scores, dtype=np.float64) for s in systems])
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["transaction_id", "is_fraud", "weight", *(s.name for s in systems)])
        for tx_id, label, weight, row in zip(ids, labels, weights, scores, strict=True):
            writer.writerow([tx_id, int(label), f"{weight:.6g}", *(f"{v:.9g}" for v in row)])
