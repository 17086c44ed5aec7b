"""Fine-tune a causal LM to answer a closed question with one of a few short labels.

Each example is ``(prompt, label)``; the label is the continuation the model should give
(e.g. ``" yes"`` or ``" no"``). Only the label carries loss: the cross-entropy of the label's
tokens after the prompt, either over the whole vocabulary (``loss="vocab"``) or over the
labels seen in training (``loss="labels"``, single-token labels only: exactly the
probability the server's ``Score`` returns, softmaxed across the labels). Inputs are built
and batched as ``.labels`` describes.

``finetune_`` trains in place through ``.training``'s loop (schedule, time budget,
clipping, parameter groups, checkpoints, the budget plan), with optional bfloat16 autocast
where the CPU runs it natively, optional class balancing (oversampling rarer
labels, or weighting them) and optionally only the last ``train_layers`` transformer blocks:
earlier blocks and the embeddings are frozen, so no backward pass runs through them (about
half the cost of a step on CPU). It never touches ``torch.set_num_threads``. As a recipe stage
(``finetune``) it trains on the examples the run was given (the fraud trainer prepares them).

Imports ``.labels``, ``.progress``, ``.stage``, ``.training``; torch inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, cast

from slimserve.compression.labels import (
    LabelTable,
    continuation_logprobs,
    cut,
    label_table,
    last_logits,
    pad_id,
    prompt_ids,
)
from slimserve.compression.progress import Progress
from slimserve.compression.stage import (
    StageContext,
    StageOutcome,
    StageSpec,
    check_choice,
    check_int,
)
from slimserve.compression.training import TrainingConfig, derive_seed, train_

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Balance = Literal["none", "oversample", "weight"]
BALANCES: Final[tuple[Balance, ...]] = ("none", "oversample", "weight")
LossKind = Literal["vocab", "labels"]
LOSSES: Final[tuple[LossKind, ...]] = ("vocab", "labels")


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneConfig(TrainingConfig):
    """How to fine-tune; the training settings read as ``TrainingConfig`` describes.

    ``balance``: ``oversample`` draws every label equally often; ``weight`` draws examples
    uniformly and scales each example's loss by ``n / (labels * count(label))``; ``none``
    draws uniformly. ``max_seq_len`` caps prompt + label tokens; longer prompts lose their
    oldest tokens. ``train_layers`` (0 = all) trains only the last N transformer blocks and
    the final norm. ``loss`` is ``vocab`` or ``labels`` (see the module docstring).

    Version 2: ``grad_clip`` (0 = off) became ``max_grad_norm`` (None = off), ``max_minutes``
    0 became None for no limit, weight decay skips norms, biases and embeddings, and
    ``decay`` and ``checkpoint_every`` appeared; ``from_dict`` reads version 1.
    """

    version: int = 2
    OLD_VERSIONS: ClassVar[frozenset[int]] = frozenset({1})
    steps: int = 300
    lr: float = 2e-4
    warmup_steps: int = 20
    batch_size: int = 8
    balance: Balance = "oversample"
    loss: LossKind = "vocab"
    train_layers: int = 0
    max_seq_len: int = 512
    # Forwards under torch.autocast(bfloat16) where the device runs bf16 natively
    # (``distill.bf16_pays``); weights, gradients and AdamW stay float32.
    autocast_bf16: bool = False

    def validate(self) -> None:
        TrainingConfig.validate(self)
        if not isinstance(self.autocast_bf16, bool):
            raise ValueError(f"autocast_bf16={self.autocast_bf16!r} is invalid; use true or false")
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("train_layers", self.train_layers, minimum=0)
        check_int("max_seq_len", self.max_seq_len, minimum=2)
        check_choice("loss", self.loss, LOSSES)
        check_choice("balance", self.balance, BALANCES)

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Version 1 spelled "off" and "no limit" as 0: ``grad_clip`` and ``max_minutes``."""
        out = dict(data)
        if "grad_clip" in out:
            clip = out.pop("grad_clip")
            out["max_grad_norm"] = clip or None
        if "max_minutes" in out:
            out["max_minutes"] = out["max_minutes"] or None
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneReport:
    """What a run did. ``losses`` holds one mean per ``log_every`` window of this call."""

    steps: int  # optimizer steps done, counting those before a resume
    examples_seen: int
    seconds: float
    first_loss: float
    final_loss: float
    losses: tuple[float, ...]
    label_counts: dict[str, int]
    truncated: int  # examples whose prompt was cut to fit max_seq_len
    stopped_early: bool  # max_minutes ran out before ``config.steps``
    resumed_from_step: int | None
    budget: dict[str, Any] | None  # how ``max_minutes`` sized the run (``BudgetPlan``)
    autocast_bf16: bool  # whether forwards actually ran under bfloat16 autocast
    config: FinetuneConfig = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """What a manifest records (the config is recorded with the stage)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        out["losses"] = list(self.losses)
        return out


@dataclass(frozen=True, slots=True)
class _Example:
    prompt: list[int]  # token ids, cut to fit max_seq_len
    label: int  # index into LabelTable


def finetune_(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    config: FinetuneConfig,
    progress: Progress | None = None,
    *,
    checkpoint_dir: Path | None = None,
) -> FinetuneReport:
    """Train ``model`` in place to continue each prompt with its label.

    Examples are drawn with replacement (seeded by step), so ``steps * batch_size`` may exceed
    their number. ``progress`` gets a ``"finetune"`` event every ``log_every`` steps and after
    the last. With a ``checkpoint_dir`` the run checkpoints and resumes as ``.training``
    describes. The model is left in eval mode with its parameters' ``requires_grad`` restored.

    Raises:
        ValueError: no examples; a label that encodes to no tokens; ``loss="labels"`` with a
            multi-token label; ``train_layers`` above the model's number of blocks.
        CheckpointMismatchError: ``checkpoint_dir`` holds a run with another config or data.
    """
    if not examples:
        raise ValueError("no examples to fine-tune on; give at least one (prompt, label)")
    labels = label_table(tokenizer, sorted({label for _, label in examples}))
    if config.loss == "labels" and not labels.single:
        raise ValueError(f"loss='labels' needs single-token labels; {labels.texts} are not all")
    index = {text: i for i, text in enumerate(labels.texts)}
    room = config.max_seq_len - labels.longest
    full = [prompt_ids(tokenizer, p, None) for p, _ in examples]
    truncated = sum(len(ids) > room for ids in full)
    encoded = [
        _Example(cut(ids, room), index[label])
        for ids, (_, label) in zip(full, examples, strict=True)
    ]
    counts = Counter(labels.texts[e.label] for e in encoded)
    weights = _label_weights([e.label for e in encoded], len(labels.texts), config.balance)
    step = _stepper(encoded, labels, weights, config, pad_id(tokenizer))
    restore = _freeze_below_(model, config.train_layers)
    try:
        run = train_(
            model,
            step,
            config,
            names=("loss",),
            data_digest=_digest(encoded, labels),
            stage="finetune",
            checkpoint_dir=checkpoint_dir,
            progress=progress,
        )
    finally:
        cast(Any, model).eval()  # transformers' decorated `eval` is untyped
        restore()
    log.info("fine-tuned %d steps in %.0f s", run.steps_done, run.seconds)
    per_step = [h[0] for h in run.history]
    every = config.log_every
    losses = [
        sum(w) / len(w) for w in (per_step[i : i + every] for i in range(0, len(per_step), every))
    ]
    return FinetuneReport(
        steps=run.steps_done,
        examples_seen=run.calls_done * config.batch_size,
        seconds=run.seconds,
        first_loss=losses[0] if losses else math.nan,
        final_loss=losses[-1] if losses else math.nan,
        losses=tuple(losses),
        label_counts=dict(counts),
        truncated=truncated,
        stopped_early=run.steps_done < config.steps,
        resumed_from_step=run.resumed_from_step,
        budget=run.budget(),
        autocast_bf16=_autocast_on(model, config),
        config=config,
    )


def _stepper(
    examples: list[_Example],
    labels: LabelTable,
    weights: list[float],
    config: FinetuneConfig,
    pad: int,
) -> Callable[[Any, int], torch.Tensor]:
    """The loop's step: draw the step's batch, backward its weighted label loss."""
    draw = _sampler(examples, config)

    def step(model: Any, index: int) -> torch.Tensor:
        import torch

        batch = draw(index)
        device = next(model.parameters()).device
        on = _autocast_on(model, config)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on):
            per_example = _example_losses(model, batch, labels, config.loss, pad)  # (B,)
        scale = torch.tensor([weights[e.label] for e in batch], device=per_example.device)
        # Divided by B, not by the weights' sum: an unbiased estimate of the weighted loss.
        loss = (per_example * scale).mean()
        torch.autograd.backward(loss)
        return loss.detach().reshape(1).cpu()

    return step


def _example_losses(
    model: PreTrainedModel,
    batch: Sequence[_Example],
    labels: LabelTable,
    loss: LossKind,
    pad: int,
) -> torch.Tensor:
    """Per-example cross-entropy of the label, per label token, (B,)."""
    import torch
    import torch.nn.functional as F  # noqa: N812  # torch's own convention

    if labels.single:
        logits = last_logits(model, [e.prompt for e in batch], pad, keep=1)[:, -1]  # (B, V)
        columns = torch.tensor([ids[0] for ids in labels.ids], device=logits.device)
        targets = torch.tensor([e.label for e in batch], device=logits.device)
        if loss == "labels":
            return F.cross_entropy(logits[:, columns].float(), targets, reduction="none")
        return F.cross_entropy(logits.float(), columns[targets], reduction="none")
    seqs = [e.prompt + list(labels.ids[e.label]) for e in batch]
    spans = [len(labels.ids[e.label]) for e in batch]
    logp = continuation_logprobs(model, seqs, spans, pad)  # (B,)
    return -logp / torch.tensor(spans, device=logp.device, dtype=logp.dtype)


def _autocast_on(model: Any, config: FinetuneConfig) -> bool:
    from slimserve.compression.distill import bf16_pays

    return config.autocast_bf16 and bf16_pays(next(model.parameters()).device)


def _label_weights(labels: Sequence[int], count: int, balance: Balance) -> list[float]:
    """Loss weight per label index: n / (labels x count(label)) with ``weight``, else 1."""
    if balance != "weight":
        return [1.0] * count
    seen = Counter(labels)
    return [len(labels) / (len(seen) * seen[i]) if seen[i] else 0.0 for i in range(count)]


def _sampler(examples: list[_Example], config: FinetuneConfig) -> Callable[[int], list[_Example]]:
    """Step -> its batch, seeded by (seed, step): uniform, or each label equally often."""
    by_label: dict[int, list[_Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    groups = [by_label[label] for label in sorted(by_label)]

    def draw(step: int) -> list[_Example]:
        rng = random.Random(derive_seed(config.seed, "batch", step))
        if config.balance != "oversample":
            return rng.choices(examples, k=config.batch_size)
        return [rng.choice(rng.choice(groups)) for _ in range(config.batch_size)]

    return draw


def _digest(examples: Sequence[_Example], labels: LabelTable) -> str:
    """sha256 of the encoded examples and the label texts: what a checkpoint trained on."""
    raw = json.dumps([labels.texts, [(e.prompt, e.label) for e in examples]])
    return hashlib.sha256(raw.encode()).hexdigest()


def _freeze_below_(model: PreTrainedModel, train_layers: int) -> Callable[[], None]:
    """Freeze all but the last ``train_layers`` blocks and the final norm; returns an undo."""
    if train_layers == 0:
        return lambda: None
    import torch

    modules = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not modules:
        raise ValueError("train_layers needs a model whose blocks are an nn.ModuleList")
    blocks = max(modules, key=len)  # the decoder layers
    if train_layers > len(blocks):
        raise ValueError(f"train_layers {train_layers} exceeds the model's {len(blocks)} blocks")
    frozen = {id(p) for p in blocks[: len(blocks) - train_layers].parameters()}
    net = cast(Any, model)  # transformers' accessors are untyped
    for embedding in (net.get_input_embeddings(), net.get_output_embeddings()):
        if embedding is not None:
            frozen |= {id(p) for p in embedding.parameters()}
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, trainable in before:
        p.requires_grad_(trainable and id(p) not in frozen)

    def restore() -> None:
        for p, trainable in before:
            p.requires_grad_(trainable)

    return restore


def run_finetune(
    model: Any, tokenizer: Any, config: FinetuneConfig, ctx: StageContext
) -> StageOutcome:
    """The ``finetune`` stage: train on the run's prepared examples."""
    report = finetune_(
        model, tokenizer, ctx.examples, config, ctx.progress, checkpoint_dir=ctx.work_dir
    )
    return StageOutcome(model=model, report=report)


def check_finetune(config: FinetuneConfig, ctx: StageContext) -> None:
    if not ctx.examples:
        raise ValueError(
            "a finetune stage trains on prepared (prompt, label) examples and this run has "
            "none; pass them with the job (as `slimserve fraud train` does)"
        )


STAGE = StageSpec(
    name="finetune", config=FinetuneConfig, run=run_finetune, order=2, check=check_finetune
)
