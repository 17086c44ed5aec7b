"""Fine-tune a causal LM to answer a closed question with one of a few short labels.

Each example is ``(prompt, label)``; the label is the continuation the model should give
(e.g. ``" yes"`` or ``" no"``). Only the label carries loss: the cross-entropy of the label's
tokens after the prompt, either over the whole vocabulary (``loss="vocab"``) or over the
labels seen in training (``loss="labels"``, single-token labels only: exactly the
probability the server's ``Score`` returns, softmaxed across the labels). Token ids are built
as ``Score`` builds them: the prompt with the tokenizer's special tokens, the label without,
concatenated, so a trained model is scored on exactly what it learned.

Batches are left-padded so every label ends at the last position; the model then computes
logits only for the last few positions (``logits_to_keep``) instead of ``(B, T, vocab)``.
With single-token labels the prompt alone is run and its last position read.

``finetune_`` trains in place with AdamW, linear warm-up and cosine decay, gradient
clipping, optional class balancing (oversampling rarer labels, or weighting them) and
optionally only the last ``train_layers`` transformer blocks: earlier blocks and the
embeddings are frozen, so no backward pass runs through them (about half the cost of a step
on CPU). ``label_probabilities`` scores prompts in-process, normalised over the labels as
``Score`` normalises them. Neither touches ``torch.set_num_threads``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final, Literal, cast

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Balance = Literal["none", "oversample", "weight"]
BALANCES: Final[tuple[Balance, ...]] = ("none", "oversample", "weight")
LossKind = Literal["vocab", "labels"]
LOSSES: Final[tuple[LossKind, ...]] = ("vocab", "labels")
CONFIG_VERSION: Final = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneConfig:
    """How to fine-tune; persisted in a recipe via ``to_dict``.

    ``balance``: ``oversample`` draws every label equally often; ``weight`` draws examples
    uniformly and scales each example's loss by ``n / (labels * count(label))``; ``none``
    draws uniformly. ``max_minutes`` (0 = no limit) stops training early, after a whole step.
    ``max_seq_len`` caps prompt + label tokens; longer prompts lose their oldest tokens.
    ``train_layers`` (0 = all) trains only the last N transformer blocks and the final norm.
    ``loss`` is ``vocab`` or ``labels`` (see the module docstring).
    """

    version: int = CONFIG_VERSION
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    balance: Balance = "oversample"
    loss: LossKind = "vocab"
    train_layers: int = 0
    seed: int = 0
    max_minutes: float = 0.0
    max_seq_len: int = 512
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"version {self.version} is unknown; this code reads version 1")
        _positive("steps", self.steps)
        _positive("batch_size", self.batch_size)
        _positive("log_every", self.log_every)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr {self.lr} must be a positive number, e.g. 2e-4")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay {self.weight_decay} must be >= 0, e.g. 0.0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio {self.min_lr_ratio} must be in [0, 1]")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip {self.grad_clip} must be >= 0 (0 = no clipping)")
        _non_negative("warmup_steps", self.warmup_steps)
        _non_negative("train_layers", self.train_layers)
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is unknown; use one of {LOSSES}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance {self.balance!r} is unknown; use one of {BALANCES}")
        if not (math.isfinite(self.max_minutes) and self.max_minutes >= 0):
            raise ValueError(f"max_minutes {self.max_minutes} must be >= 0 (0 = no limit)")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len {self.max_seq_len} must be >= 2, e.g. 512")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneConfig:
        """Rebuild a config; unknown keys are refused rather than silently ignored.

        Raises:
            ValueError: an unknown key, or a value that fails validation.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class FinetuneProgress:
    """Passed to the progress callback every ``log_every`` steps and after the last one."""

    step: int
    steps: int
    loss: float  # mean loss since the previous report
    lr: float
    elapsed_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneReport:
    """What a run did. ``losses`` holds one mean per ``log_every`` window."""

    steps: int
    examples_seen: int
    seconds: float
    first_loss: float
    final_loss: float
    losses: tuple[float, ...]
    label_counts: dict[str, int]
    truncated: int  # examples whose prompt was cut to fit max_seq_len
    stopped_early: bool  # max_minutes ran out before ``config.steps``
    config: FinetuneConfig = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        out["losses"] = list(self.losses)
        out["config"] = self.config.to_dict()
        return out


@dataclass(frozen=True, slots=True)
class _Labels:
    """The label set: texts (sorted) and their token ids."""

    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]

    @property
    def single(self) -> bool:
        return all(len(ids) == 1 for ids in self.ids)

    @property
    def longest(self) -> int:
        return max(len(ids) for ids in self.ids)


@dataclass(frozen=True, slots=True)
class _Example:
    prompt: list[int]  # token ids, cut to fit max_seq_len
    label: int  # index into _Labels


def finetune_(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    config: FinetuneConfig,
    progress: Callable[[FinetuneProgress], None] | None = None,
) -> FinetuneReport:
    """Train ``model`` in place to continue each prompt with its label.

    Examples are drawn with replacement (seeded), so ``steps * batch_size`` may exceed their
    number. The model is left in eval mode with its parameters' ``requires_grad`` restored.

    Raises:
        ValueError: no examples; a label that encodes to no tokens; ``loss="labels"`` with a
            multi-token label; ``train_layers`` above the model's number of blocks.
    """
    if not examples:
        raise ValueError("no examples to fine-tune on; give at least one (prompt, label)")
    labels = _label_table(tokenizer, sorted({label for _, label in examples}))
    if config.loss == "labels" and not labels.single:
        raise ValueError(f"loss='labels' needs single-token labels; {labels.texts} are not all")
    index = {text: i for i, text in enumerate(labels.texts)}
    room = config.max_seq_len - labels.longest
    full = [_prompt_ids(tokenizer, p, None) for p, _ in examples]
    truncated = sum(len(ids) > room for ids in full)
    encoded = [
        _Example(_cut(ids, room), index[label])
        for ids, (_, label) in zip(full, examples, strict=True)
    ]
    counts = Counter(labels.texts[e.label] for e in encoded)
    restore = _freeze_below_(model, config.train_layers)
    try:
        losses, steps, seconds = _train(
            model, tokenizer, encoded, labels, config, progress=progress
        )
    finally:
        cast(Any, model).eval()  # transformers' decorated `eval` is untyped
        restore()
    log.info("fine-tuned %d steps in %.0f s", steps, seconds)
    return FinetuneReport(
        steps=steps,
        examples_seen=steps * config.batch_size,
        seconds=seconds,
        first_loss=losses[0] if losses else math.nan,
        final_loss=losses[-1] if losses else math.nan,
        losses=tuple(losses),
        label_counts=dict(counts),
        truncated=truncated,
        stopped_early=steps < config.steps,
        config=config,
    )


def label_probabilities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    batch_size: int = 16,
    max_seq_len: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[float]]:
    """For each prompt, the probability of each label (in ``labels`` order), summing to 1.

    As the server's ``Score``: the sum of the label tokens' log-probabilities after the
    prompt, softmaxed across the labels. ``progress(done, total)`` is called per batch.

    Raises:
        ValueError: no labels, or a label that encodes to no tokens.
    """
    import torch

    if not labels:
        raise ValueError("labels is empty; give at least one label, e.g. [' yes', ' no']")
    table = _label_table(tokenizer, list(labels))
    pad_id = _pad_id(tokenizer)
    room = max_seq_len - table.longest
    out: list[list[float]] = []
    was_training = model.training
    cast(Any, model).eval()
    try:
        with torch.inference_mode():
            for begin in range(0, len(prompts), batch_size):
                chunk = [
                    _prompt_ids(tokenizer, p, room) for p in prompts[begin : begin + batch_size]
                ]
                logp = _label_logprobs(model, chunk, table, pad_id)  # (b, labels)
                out.extend(torch.softmax(logp, dim=-1).tolist())
                if progress is not None:
                    progress(len(out), len(prompts))
    finally:
        model.train(was_training)
    return out


def _train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[_Example],
    labels: _Labels,
    config: FinetuneConfig,
    *,
    progress: Callable[[FinetuneProgress], None] | None,
) -> tuple[list[float], int, float]:
    """The optimisation loop; returns (window mean losses, steps done, seconds)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    weights = _label_weights([e.label for e in examples], len(labels.texts), config.balance)
    draw = _sampler(examples, config)
    pad_id = _pad_id(tokenizer)
    start = time.monotonic()
    deadline = start + 60 * config.max_minutes if config.max_minutes else math.inf
    losses: list[float] = []
    window: list[float] = []
    step = 0
    model.train()
    while step < config.steps and time.monotonic() < deadline:
        batch = draw()
        lr = config.lr * lr_factor(config, step, time.monotonic() - start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        per_example = _example_losses(model, batch, labels, config.loss, pad_id)  # (B,)
        scale = torch.tensor([weights[e.label] for e in batch], device=per_example.device)
        # Divided by B, not by the weights' sum: an unbiased estimate of the weighted loss.
        loss = (per_example * scale).mean()
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        step += 1
        window.append(float(loss.detach()))
        if step % config.log_every == 0 or step == config.steps:
            losses.append(sum(window) / len(window))
            window.clear()
            if progress is not None:
                elapsed = time.monotonic() - start
                progress(FinetuneProgress(step, config.steps, losses[-1], lr, elapsed))
    if window:
        losses.append(sum(window) / len(window))
    return losses, step, time.monotonic() - start


def _example_losses(
    model: PreTrainedModel,
    batch: Sequence[_Example],
    labels: _Labels,
    loss: LossKind,
    pad_id: int,
) -> torch.Tensor:
    """Per-example cross-entropy of the label, per label token, (B,)."""
    import torch
    import torch.nn.functional as F  # noqa: N812  # torch's own convention

    if labels.single:
        logits = _last_logits(model, [e.prompt for e in batch], pad_id, keep=1)[:, -1]  # (B, V)
        columns = torch.tensor([ids[0] for ids in labels.ids], device=logits.device)
        targets = torch.tensor([e.label for e in batch], device=logits.device)
        if loss == "labels":
            return F.cross_entropy(logits[:, columns].float(), targets, reduction="none")
        return F.cross_entropy(logits.float(), columns[targets], reduction="none")
    seqs = [e.prompt + list(labels.ids[e.label]) for e in batch]
    spans = [len(labels.ids[e.label]) for e in batch]
    logp = _continuation_logprobs(model, seqs, spans, pad_id)  # (B,)
    return -logp / torch.tensor(spans, device=logp.device, dtype=logp.dtype)


def _label_logprobs(
    model: PreTrainedModel, prompts: Sequence[list[int]], labels: _Labels, pad_id: int
) -> torch.Tensor:
    """Vocabulary log-probability of every label after every prompt, (B, labels)."""
    import torch

    if labels.single:
        logits = _last_logits(model, prompts, pad_id, keep=1)[:, -1].float()  # (B, V)
        columns = torch.tensor([ids[0] for ids in labels.ids], device=logits.device)
        return torch.log_softmax(logits, dim=-1)[:, columns]
    seqs = [p + list(ids) for p in prompts for ids in labels.ids]
    spans = [len(ids) for _ in prompts for ids in labels.ids]
    return _continuation_logprobs(model, seqs, spans, pad_id).view(len(prompts), -1)


def _continuation_logprobs(
    model: PreTrainedModel, seqs: Sequence[list[int]], spans: Sequence[int], pad_id: int
) -> torch.Tensor:
    """Summed log-probability of the last ``spans[i]`` tokens of each sequence, (B,)."""
    import torch

    keep = max(spans) + 1
    logits = _last_logits(model, seqs, pad_id, keep=keep)  # (B, keep, V)
    # Position j of the kept window predicts token j + 1 of the window; the last predicts
    # past the end and is dropped.
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, keep - 1, V)
    targets = torch.tensor([s[-(keep - 1) :] for s in _left_pad(seqs, pad_id, keep - 1)])
    targets = targets.to(logp.device)
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, keep - 1)
    span = torch.tensor(spans, device=logp.device).unsqueeze(1)  # (B, 1)
    in_label = torch.arange(keep - 1, device=logp.device) >= (keep - 1 - span)
    return (token_logp * in_label).sum(dim=1)


def _last_logits(
    model: PreTrainedModel, seqs: Sequence[list[int]], pad_id: int, *, keep: int
) -> torch.Tensor:
    """Logits of the last ``keep`` positions of left-padded sequences, (B, keep, vocab)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.tensor(_left_pad(seqs, pad_id, width), device=device)  # (B, T)
    mask = torch.tensor(
        [[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device
    )  # (B, T)
    # Positions count from each row's first real token, as for an unpadded prompt.
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
    logits: torch.Tensor = out.logits
    return logits


def _left_pad(seqs: Sequence[list[int]], pad_id: int, width: int) -> list[list[int]]:
    return [[pad_id] * (width - len(s)) + s[-width:] for s in seqs]


def _label_table(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> _Labels:
    ids = []
    for text in texts:
        encoded = tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()
        if not encoded:
            raise ValueError(f"label {text!r} encodes to no tokens; use a non-empty label")
        ids.append(tuple(int(i) for i in encoded))
    return _Labels(tuple(texts), tuple(ids))


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, room: int | None) -> list[int]:
    """The prompt as the server encodes it (with special tokens), cut to ``room`` if given."""
    ids = [int(i) for i in tokenizer(prompt, add_special_tokens=True)["input_ids"]]
    return ids if room is None else _cut(ids, room)


def _cut(ids: list[int], room: int) -> list[int]:
    """The last ``room`` tokens: a long prompt loses its oldest tokens, keeping the question."""
    if room < 1:
        raise ValueError("max_seq_len leaves no room for a prompt after the longest label")
    return ids[-room:]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)  # masked out either way


def _label_weights(labels: Sequence[int], count: int, balance: Balance) -> list[float]:
    """Loss weight per label index: n / (labels x count(label)) with ``weight``, else 1."""
    if balance != "weight":
        return [1.0] * count
    seen = Counter(labels)
    return [len(labels) / (len(seen) * seen[i]) if seen[i] else 0.0 for i in range(count)]


def _sampler(examples: list[_Example], config: FinetuneConfig) -> Callable[[], list[_Example]]:
    """A seeded batch drawer: uniform, or (oversample) each label equally often."""
    rng = random.Random(config.seed)
    if config.balance != "oversample":
        return lambda: rng.choices(examples, k=config.batch_size)
    by_label: dict[int, list[_Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    groups = [by_label[label] for label in sorted(by_label)]
    return lambda: [rng.choice(rng.choice(groups)) for _ in range(config.batch_size)]


def lr_factor(config: FinetuneConfig, step: int, elapsed_s: float) -> float:
    """Multiplier of ``lr`` at a step: linear warm-up, then cosine to ``min_lr_ratio``.

    With ``max_minutes``, the cosine runs to whichever end comes first, the last step or the
    time limit (by ``elapsed_s``, seconds since training began): a run the clock stops still
    anneals to the low rate instead of ending at the peak.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_steps = max(config.steps - config.warmup_steps, 1)
    progress = (step - config.warmup_steps) / decay_steps
    if config.max_minutes:
        progress = max(progress, elapsed_s / (60 * config.max_minutes))
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


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


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} {value!r} must be a positive integer")


def _non_negative(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} {value!r} must be an integer >= 0")
