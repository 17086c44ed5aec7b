"""Train the fraud scorer: fine-tune the base model on labelled history, evaluate, publish.

The steps, in order:

1. Read the labelled file (rejected lines are reported, not used), sort it by time and
   render every payment's prompt from the payments before it (``stream_prompts``).
2. Split by time: the last ``holdout`` share of the stream is held out for evaluation
   (with ``eval_data``, that file is the evaluation set and all of this one trains).
3. Sample the training pool from the earlier part: every fraud and ``legit_per_fraud``
   legitimate payments per fraud, drawn uniformly. The fine-tune balances the classes.
4. Fine-tune the base model to answer ``LABEL_FRAUD`` or ``LABEL_LEGIT``: a one-stage
   recipe (``finetune``) run by the compression pipeline on the pool's prompts and labels,
   which refuses a quantized base and checkpoints in the registry's work directory.
5. Evaluate in-process on a class-stratified sample of the held-out rows (every fraud up to
   ``eval_frauds``, ``eval_legit`` legitimate ones): a forward pass per payment is costly on
   CPU, and a uniform sample would hold a handful of frauds. ROC-AUC does not depend on the
   class mix; PR-AUC is computed with each sampled legitimate payment weighted by
   (held-out legit) / (sampled legit), i.e. at the held-out file's fraud rate. The classical
   baseline, trained on the same training rows, is scored on the same sample and on the
   whole held-out set.
6. Publish the model through the same pipeline as every compressed version: the next
   version of ``name`` with its parent, recipe (the finetune stage, its report, labels,
   prompt and sampling), data (file name and sha256) and metrics; optionally set an alias.

torch, transformers and the compression package are imported inside ``train_fraud_scorer``
and the scoring helper only, so importing this module keeps the client install light.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

from slimserve.fraud.baseline import predict_features, train_baseline
from slimserve.fraud.features import (
    LABEL_FRAUD,
    LABEL_LEGIT,
    LABELS,
    PROMPT_FORMAT,
    FeatureConfig,
    build_features,
)
from slimserve.fraud.metrics import average_precision, roc_auc, stratified_sample
from slimserve.fraud.schema import RowError, Transaction, read_transactions
from slimserve.fraud.scorer import stream_prompts, time_sorted
from slimserve.registry.store import sha256_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from slimserve.compression.finetune import FinetuneConfig, FinetuneReport
    from slimserve.compression.progress import Progress, ProgressEvent

RECIPE_NAME: Final = "fraud-finetune"
RECIPE_DESCRIPTION: Final = "Fine-tune a base model to answer whether a payment is fraud."


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Everything ``slimserve fraud train`` needs; see the module docstring for the steps."""

    data: Path
    registry: Path
    finetune: FinetuneConfig
    base: str = "smollm2-135m-instruct"  # NAME[@VERSION|@ALIAS] in the registry
    name: str = "fraud-scorer"
    alias: str | None = None
    holdout: float = 0.2
    eval_data: Path | None = None
    legit_per_fraud: float = 4.0
    eval_frauds: int = 150
    eval_legit: int = 350
    eval_batch_size: int = 16
    seed: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout {self.holdout} must be in (0, 1), e.g. 0.2")
        if not self.legit_per_fraud > 0:
            raise ValueError(f"legit_per_fraud {self.legit_per_fraud} must be > 0, e.g. 4")
        if self.eval_frauds < 1 or self.eval_legit < 1:
            raise ValueError(
                f"eval_frauds {self.eval_frauds} and eval_legit {self.eval_legit} must be >= 1"
            )
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size {self.eval_batch_size} must be >= 1")


@dataclass(frozen=True, slots=True)
class LabelledStream:
    """A labelled file sorted by time, with every payment's prompt and rejected lines."""

    rows: list[Transaction]
    prompts: list[str]
    labels: list[int]
    errors: list[RowError]


@dataclass(frozen=True, slots=True)
class EvalSample:
    """Indices into a stream, and the weight of each sampled legit payment in PR-AUC."""

    indices: list[int]
    legit_weight: float


@dataclass(frozen=True, slots=True)
class DataPlan:
    """What trains and what evaluates: ``train.rows[:end]`` feed the pool and the baseline;
    the sample is drawn from ``held_out`` from ``eval_start`` on."""

    train: LabelledStream
    held_out: LabelledStream
    end: int
    eval_start: int
    pool: list[int]  # indices into train
    sample: EvalSample  # indices into held_out

    def describe(self) -> str:
        frauds = sum(self.train.labels[i] for i in self.pool)
        return (
            f"{len(self.train.rows)} labelled rows ({len(self.train.errors)} field errors); "
            f"training pool {len(self.pool)} ({frauds} frauds) from the first {self.end}; "
            f"evaluating on {len(self.sample.indices)} held-out rows"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    ref: str  # name@version published
    digest: str
    metrics: dict[str, float]
    finetune: FinetuneReport


def load_labelled(path: Path, features: FeatureConfig | None = None) -> LabelledStream:
    """Read ``path``, keep labelled rows in time order, and render their prompts.

    Raises:
        ValueError: no labelled rows, or the extension is neither CSV nor JSONL.
    """
    read = read_transactions(path)
    rows = [tx for tx in time_sorted(read.rows) if tx.is_fraud is not None]
    if not rows:
        raise ValueError(f"{path} holds no labelled rows; training needs is_fraud labels")
    labels = [int(tx.is_fraud or 0) for tx in rows]
    return LabelledStream(rows, stream_prompts(rows, features), labels, read.errors)


def training_pool(labels: Sequence[int], end: int, legit_per_fraud: float, seed: int) -> list[int]:
    """Indices before ``end``: every fraud and ``legit_per_fraud`` legit ones per fraud.

    Raises:
        ValueError: no fraud or no legitimate payment before ``end``.
    """
    frauds = [i for i in range(end) if labels[i] == 1]
    legit = [i for i in range(end) if labels[i] == 0]
    if not frauds or not legit:
        raise ValueError(
            f"the training part holds {len(frauds)} frauds and {len(legit)} legitimate "
            "payments; it needs both (simulate more customers or days)"
        )
    wanted = min(len(legit), round(legit_per_fraud * len(frauds)))
    return sorted(frauds + random.Random(seed).sample(legit, wanted))


def evaluation_sample(
    labels: Sequence[int], start: int, frauds: int, legit: int, seed: int
) -> EvalSample:
    """A class-stratified sample of indices from ``start`` on (see the module docstring).

    Raises:
        ValueError: the held-out part lacks one of the classes.
    """
    rng = random.Random(seed + 1)
    pos = [i for i in range(start, len(labels)) if labels[i] == 1]
    neg = [i for i in range(start, len(labels)) if labels[i] == 0]
    if not pos or not neg:
        raise ValueError(
            f"the held-out part holds {len(pos)} frauds and {len(neg)} legitimate payments; "
            "it needs both (raise --holdout or give --eval-data)"
        )
    return EvalSample(*stratified_sample(pos, neg, frauds, legit, rng))


def sample_metrics(
    labels: Sequence[int], scores: Sequence[float], legit_weight: float
) -> dict[str, float]:
    """ROC-AUC and reweighted PR-AUC of scores on an ``EvalSample``."""
    weights = [1.0 if y else legit_weight for y in labels]
    return {
        "roc_auc": roc_auc(labels, scores),
        "pr_auc": average_precision(labels, scores, weights),
    }


def plan_data(config: TrainConfig) -> DataPlan:
    """Steps 1-3 and the evaluation sample of step 5 (see the module docstring).

    Raises:
        ValueError: a file holds no labelled rows, or a part lacks a class it needs.
    """
    train = load_labelled(config.data, config.features)
    if config.eval_data is None:
        held_out, end = train, int(len(train.rows) * (1 - config.holdout))
        eval_start = end
    else:
        held_out, end = load_labelled(config.eval_data, config.features), len(train.rows)
        eval_start = 0
    pool = training_pool(train.labels, end, config.legit_per_fraud, config.seed)
    sample = evaluation_sample(
        held_out.labels, eval_start, config.eval_frauds, config.eval_legit, config.seed
    )
    return DataPlan(train, held_out, end, eval_start, pool, sample)


def train_fraud_scorer(
    config: TrainConfig,
    *,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> TrainResult:
    """Run the steps of the module docstring; returns what was published.

    ``progress`` gets the fine-tune's events (``"[1/1] finetune"``, with ``loss`` and ``lr``
    every ``log_every`` steps); ``say`` gets a line per step of the docstring.

    Raises:
        ValueError: the data lack a class where one is needed, or the base is quantized.
        CompressionError: the base model is not in the registry, or fails verification.
    """
    from slimserve.compression.recipe import (
        CompressJob,
        Recipe,
        Stage,
        publish_compressed,
        run_stages,
    )
    from slimserve.registry.store import Registry, parse_model_ref

    note = say or (lambda _: None)
    registry = Registry(config.registry)
    base = registry.get(*parse_model_ref(config.base))
    plan = plan_data(config)
    note(plan.describe())
    job = CompressJob(
        recipe=Recipe(RECIPE_NAME, RECIPE_DESCRIPTION, (Stage(config.finetune),)),
        parent=base,
        to_name=config.name,
        examples=[(plan.train.prompts[i], LABELS[plan.train.labels[i]]) for i in plan.pool],
    )
    done = run_stages(registry, job, progress)
    report = cast("FinetuneReport", done.report("finetune"))  # the recipe's one stage
    note(f"fine-tuned {report.steps} steps in {report.seconds:.0f} s; evaluating")
    started = time.monotonic()
    scores = _score_sample(done.model, done.tokenizer, config, plan, note)
    metrics = _metrics(config, plan, scores, report)
    metrics["eval_seconds"] = time.monotonic() - started
    artifact = publish_compressed(
        registry,
        job,
        done,
        metrics=metrics,
        notes=_notes(config, len(plan.pool)),
        data=_data(config, plan),
    )
    if config.alias:
        registry.set_alias(config.name, config.alias, artifact.version)
    return TrainResult(ref=artifact.ref, digest=artifact.digest, metrics=metrics, finetune=report)


def _score_sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    plan: DataPlan,
    note: Callable[[str], None],
) -> list[float]:
    """The fine-tuned model's fraud probability for every row of the evaluation sample."""
    from slimserve.compression.labels import label_probabilities

    probabilities = label_probabilities(
        model,
        tokenizer,
        [plan.held_out.prompts[i] for i in plan.sample.indices],
        [LABEL_FRAUD, LABEL_LEGIT],
        batch_size=config.eval_batch_size,
        max_seq_len=config.finetune.max_seq_len,
        progress=_eval_progress(note, config.eval_batch_size),
    )
    return [p[0] for p in probabilities]


def _eval_progress(note: Callable[[str], None], batch_size: int) -> Progress:
    """A line every five batches and at the end."""

    def report(event: ProgressEvent) -> None:
        if event.done == event.total or event.done % (5 * batch_size) == 0:
            note(f"evaluated {event.done}/{event.total} held-out rows")

    return report


def _metrics(
    config: TrainConfig, plan: DataPlan, scores: Sequence[float], report: FinetuneReport
) -> dict[str, float]:
    """The model's and the baseline's figures on the sample, the baseline's on every row."""
    labels = [plan.held_out.labels[i] for i in plan.sample.indices]
    train_rows = plan.train.rows[: plan.end]
    baseline = train_baseline(train_rows, config=config.features, seed=config.seed)
    features = build_features(plan.held_out.rows, config.features)
    start = plan.eval_start
    baseline_all = predict_features(baseline, features[start:])
    baseline_sample = [baseline_all[i - start] for i in plan.sample.indices]
    ours = sample_metrics(labels, scores, plan.sample.legit_weight)
    theirs = sample_metrics(labels, baseline_sample, plan.sample.legit_weight)
    full_labels = plan.held_out.labels[start:]
    return {
        **ours,
        "baseline_roc_auc": theirs["roc_auc"],
        "baseline_pr_auc": theirs["pr_auc"],
        "baseline_roc_auc_all": roc_auc(full_labels, baseline_all),
        "baseline_pr_auc_all": average_precision(full_labels, baseline_all),
        "eval_rows": float(len(labels)),
        "eval_frauds": float(sum(labels)),
        "eval_legit_weight": plan.sample.legit_weight,
        "held_out_rows": float(len(full_labels)),
        "held_out_fraud_rate": sum(full_labels) / len(full_labels),
        "train_steps": float(report.steps),
        "train_seconds": report.seconds,
        "train_loss_first": report.first_loss,
        "train_loss_final": report.final_loss,
        "prompt_format": float(PROMPT_FORMAT),
    }


def _notes(config: TrainConfig, pool: int) -> dict[str, Any]:
    """What the recipe record adds to the finetune stage: labels, prompt, sampling."""
    return {
        "labels": {"fraud": LABEL_FRAUD, "legit": LABEL_LEGIT},
        "prompt": "slimserve.fraud.features.render_prompt",
        "prompt_format": PROMPT_FORMAT,
        "features": {
            "label_delay_s": config.features.label_delay.total_seconds(),
            "terminal_window_s": config.features.terminal_window.total_seconds(),
            "tiny_amount": config.features.tiny_amount,
        },
        "sampling": {
            "holdout": None if config.eval_data else config.holdout,
            "legit_per_fraud": config.legit_per_fraud,
            "pool": pool,
            "eval_frauds": config.eval_frauds,
            "eval_legit": config.eval_legit,
            "seed": config.seed,
        },
    }


def _data(config: TrainConfig, plan: DataPlan) -> dict[str, Any]:
    train, held_out = plan.train, plan.held_out
    data: dict[str, Any] = {
        "file": config.data.name,
        "sha256": sha256_file(config.data),
        "rows": len(train.rows),
        "frauds": sum(train.labels),
        "rejected_lines": len({e.line_number for e in train.errors}),
    }
    if config.eval_data is not None:
        data["eval_file"] = config.eval_data.name
        data["eval_sha256"] = sha256_file(config.eval_data)
        data["eval_rows"] = len(held_out.rows)
    return data
