"""The one training loop behind distillation and fine-tuning, and the settings it reads.

``train_`` runs optimizer steps of a stage's ``step_fn`` (forward and backward of one step's
batches) with, in this order each step: a seed for the step, the learning rate of
``lr_factor``, the step, gradient clipping, AdamW, a reduction of the step's metrics over DDP
ranks, a checkpoint when due, and a progress report every ``log_every`` steps.

One convention per setting (``TrainingConfig``): ``None`` means off or no limit
(``max_grad_norm``, ``max_minutes``); the schedule is a linear warm-up then a cosine (or
linear) decay to ``lr * min_lr_ratio``, which, under a time budget, runs to whichever end
comes first, the last step or the clock, so a run the clock stops still anneals. The budget
stops the run before a step that, judged by the mean step so far, would overrun it; at least
one step runs. Weight decay applies to matrices only: never to norms, biases or embeddings
(input and output, which may be one tied tensor).

The data order and every random draw are functions of ``(seed, step)``, so a run resumed from
a checkpoint ends with the same weights as an uninterrupted one.

Imports ``.checkpoint``, ``.distributed``, ``.progress`` and ``.stage``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from slimserve.compression.checkpoint import load_checkpoint, save_checkpoint
from slimserve.compression.distributed import Dist
from slimserve.compression.progress import Progress, ProgressEvent
from slimserve.compression.stage import StageConfig, check_choice, check_float, check_int

log = logging.getLogger(__name__)

Decay = Literal["cosine", "linear"]
DECAYS: tuple[Decay, ...] = ("cosine", "linear")

#: step_fn(model, step) -> (k,) metrics of the step, loss first; gradients accumulate in model.
StepFn = Callable[[nn.Module, int], torch.Tensor]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingConfig(StageConfig):
    """The settings every training stage reads the same way (see the module docstring)."""

    steps: int = 100  # optimizer steps
    lr: float = 1e-4  # AdamW's peak learning rate
    weight_decay: float = 0.0  # matrices only, never norms, biases or embeddings
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    decay: Decay = "cosine"  # after warm-up, down to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0  # None: no clipping
    # Wall-clock budget of one call, in minutes; None: no limit.
    max_minutes: float | None = None
    checkpoint_every: int = 50  # steps; a checkpoint is also written at the end
    seed: int = 0
    log_every: int = 10  # steps per log line and progress report

    #: Fields that change how long or how loudly a run goes, not the weights it produces: a
    #: run stopped by its time budget may resume with a larger one.
    NON_TRAJECTORY: ClassVar[frozenset[str]] = frozenset(
        {"max_minutes", "checkpoint_every", "log_every"}
    )

    def validate(self) -> None:
        for name in ("steps", "checkpoint_every", "log_every"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("seed", self.seed, minimum=0)
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; "
                "use at most steps warmup steps"
            )
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        check_choice("decay", self.decay, DECAYS)
        if self.max_grad_norm is not None:
            check_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        if self.max_minutes is not None:
            check_float("max_minutes", self.max_minutes, low=0.0, low_open=True)

    def digest(self) -> str:
        """sha256 of the fields that decide the trained weights (not budget or logging)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in self.NON_TRAJECTORY}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainReport:
    """What a ``train_`` call did. Metrics are means over ranks."""

    steps_done: int  # optimizer steps completed, counting those before a resume
    steps_run: int  # optimizer steps taken in this call
    resumed_from_step: int | None  # step of the checkpoint this call started from
    history: tuple[tuple[float, ...], ...]  # per step of this call: the step's metrics
    seconds: float  # wall clock of this call
    stopped_by_time: bool
    world_size: int
    rank: int  # this process's rank; 0 without DDP


def lr_factor(config: TrainingConfig, step: int, elapsed_s: float) -> float:
    """Multiplier of ``lr`` at the 0-based optimizer ``step``, ``elapsed_s`` into the run.

    Linear warm-up, then the decay to ``min_lr_ratio``; with ``max_minutes``, the decay runs
    to whichever end comes first, the last step or the time limit.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = (step - config.warmup_steps) / span
    if config.max_minutes is not None:
        progress = max(progress, elapsed_s / (60 * config.max_minutes))
    progress = min(1.0, progress)
    if config.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def derive_seed(seed: int, tag: str, index: int) -> int:
    """A 63-bit seed for draw ``index`` of kind ``tag``, independent of any other draw."""
    raw = hashlib.sha256(f"{seed}:{tag}:{index}".encode()).digest()
    return int.from_bytes(raw[:8], "big") & (2**63 - 1)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: decayed matrices, and the rest undecayed
    (norms, biases, input and output embeddings). A tied tensor appears once."""
    embeddings = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, nn.Module):
        embeddings |= {id(p) for p in output.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.ndim >= 2 and id(p) not in embeddings]
    kept = [p for p in params if p.ndim < 2 or id(p) in embeddings]
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": kept, "weight_decay": 0.0},
    ]


def train_(
    model: nn.Module,
    step_fn: StepFn,
    config: TrainingConfig,
    *,
    names: Sequence[str],
    data_digest: str,
    stage: str,
    checkpoint_dir: Path | None = None,
    progress: Progress | None = None,
    dist: Dist | None = None,
) -> TrainReport:
    """Train ``model`` in place for ``config.steps`` steps of ``step_fn`` (or until the budget).

    ``names`` names the metrics ``step_fn`` returns (``"loss"`` first). With a
    ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps and at the
    end, and a run resumes from the newest one found there. The model is left in training
    mode; the caller restores the mode it wants. torch's global RNG state is restored.

    Raises:
        CheckpointMismatchError: ``checkpoint_dir`` holds a run with another config or data.
        IntegrityError: a checkpoint file does not match its recorded sha256.
    """
    ctx = dist or Dist.single()
    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        return _loop(
            model,
            step_fn,
            config,
            names=tuple(names),
            digests={"config_digest": config.digest(), "data_digest": data_digest},
            stage=stage,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            ctx=ctx,
        )


def _loop(
    model: nn.Module,
    step_fn: StepFn,
    config: TrainingConfig,
    *,
    names: tuple[str, ...],
    digests: Mapping[str, str],
    stage: str,
    checkpoint_dir: Path | None,
    progress: Progress | None,
    ctx: Dist,
) -> TrainReport:
    started = time.monotonic()
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    resumed = None
    if checkpoint_dir is not None:
        resumed = load_checkpoint(checkpoint_dir, model, optimizer, config, digests=digests)
    ctx.barrier()  # every rank has read the checkpoint before rank 0 may replace it
    net = ctx.wrap(model)
    model.train()
    history: list[tuple[float, ...]] = []
    window: list[torch.Tensor] = []
    stopped = False
    step = start = resumed or 0
    loop_started = time.monotonic()
    while step < config.steps and not stopped:
        torch.manual_seed(derive_seed(config.seed, "step", step))  # dropout etc. per step
        lr = config.lr * lr_factor(config, step, time.monotonic() - started)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = step_fn(net, step)
        grad_norm = _clip(model, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        now = time.monotonic()
        late = _out_of_time(config, started, loop_started, now, step - start)
        stats, stopped = ctx.reduce(stats.detach(), late)
        history.append(tuple(float(x) for x in stats))
        window.append(stats)
        if checkpoint_dir is not None and _checkpoint_due(config, step, stopped):
            if ctx.rank == 0:
                save_checkpoint(
                    checkpoint_dir,
                    model,
                    optimizer,
                    config,
                    step=step,
                    digests=digests,
                    world_size=ctx.world_size,
                )
            ctx.barrier()
        if step % config.log_every == 0 or step == config.steps or stopped:
            mean = torch.stack(window).mean(0).tolist()
            metrics = dict(zip(names, mean, strict=True)) | {"lr": lr}
            if config.max_grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            window.clear()
            _report(
                stage,
                step=step,
                steps=config.steps,
                elapsed_s=now - started,
                metrics=metrics,
                ctx=ctx,
                progress=progress,
            )
    if stopped:
        log.warning(
            "%s stopped by its %.1f-minute budget after step %d of %d",
            stage,
            config.max_minutes,
            step,
            config.steps,
        )
    ctx.barrier()
    return TrainReport(
        steps_done=step,
        steps_run=step - start,
        resumed_from_step=resumed,
        history=tuple(history),
        seconds=time.monotonic() - started,
        stopped_by_time=stopped,
        world_size=ctx.world_size,
        rank=ctx.rank,
    )


def _report(
    stage: str,
    *,
    step: int,
    steps: int,
    elapsed_s: float,
    metrics: dict[str, float],
    ctx: Dist,
    progress: Progress | None,
) -> None:
    if ctx.rank == 0:
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        log.info("%s step %d/%d %s", stage, step, steps, shown)
    if progress is not None:
        progress(
            ProgressEvent(stage=stage, done=step, total=steps, elapsed_s=elapsed_s, metrics=metrics)
        )


def _out_of_time(
    config: TrainingConfig, started: float, loop_started: float, now: float, steps_run: int
) -> bool:
    """Whether another step, as long as the mean step so far, would overrun the budget."""
    if config.max_minutes is None:
        return False
    mean_step = (now - loop_started) / steps_run
    return now - started + mean_step > config.max_minutes * 60


def _checkpoint_due(config: TrainingConfig, step: int, stopped: bool) -> bool:
    return step % config.checkpoint_every == 0 or step == config.steps or stopped


def _clip(model: nn.Module, max_norm: float | None) -> float:
    if max_norm is None:
        return math.nan
    params = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
