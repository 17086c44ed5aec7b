"""The one training loop behind distillation and fine-tuning, and the settings it reads.

``train_`` runs optimizer steps of a stage's ``step_fn`` (forward and backward of one step's
batches) with, in this order each step: a seed for the step, the learning rate of
``lr_factor``, the step, gradient clipping, AdamW, a reduction of the step's metrics over DDP
ranks, a checkpoint when due, and a progress report every ``log_every`` steps.

One convention per setting (``TrainingConfig``): ``None`` means off or no limit
(``max_grad_norm``, ``max_minutes``); the schedule is a linear warm-up then a cosine (or
linear) decay to ``lr * min_lr_ratio``. Weight decay applies to matrices only: never to
norms, biases or embeddings (input and output, which may be one tied tensor).

Under a time budget (``max_minutes``) with ``fit_budget``, the loop times ``probe_steps``
steps (after a first, warming one) and then sizes the rest of the run so the schedule ends
inside the budget instead of being cut mid-decay (``BudgetPlan``): fewer optimizer steps
when the asked ones do not fit, or, when several times more work fits than the asked steps
need, up to ``max_accumulation`` calls of ``step_fn`` per optimizer step (their gradients
averaged), so each step sees a larger batch and the budget is used. Until a plan exists (and
with ``fit_budget`` off) the decay runs to whichever end comes first, the last step or the
clock. Whatever the plan, the budget stops the run before a step that, judged by the mean
step of the current phase, would overrun it; at least one step runs.

The data order and every random draw are functions of ``(seed, call index)``, and a plan is
saved beside the checkpoints (``budget.json``) and reused on resume, so a run resumed from a
checkpoint ends with the same weights as an uninterrupted one.

Imports ``.checkpoint``, ``.distributed``, ``.progress`` and ``.stage``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
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

#: step_fn(model, index) -> (k,) metrics of the call, loss first; gradients accumulate in
#: model. ``index`` numbers the calls (one per optimizer step unless a budget plan
#: accumulates several); each index must draw its own data.
StepFn = Callable[[nn.Module, int], torch.Tensor]
#: Seconds since an arbitrary origin (time.monotonic); tests inject a fake one.
Clock = Callable[[], float]

_PLAN_FILE = "budget.json"
# Share of the time left that a plan leaves unused: the last checkpoint, timing noise.
BUDGET_MARGIN = 0.05


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
    # With max_minutes: time the first steps, then size the run to end inside the budget.
    fit_budget: bool = True
    probe_steps: int = 3  # steps timed (after a first, warming one) before sizing
    max_accumulation: int = 8  # most step_fn calls a plan may give one optimizer step

    #: Fields that change how long or how loudly a run goes, not the weights it produces: a
    #: run stopped by its time budget may resume with a larger one.
    NON_TRAJECTORY: ClassVar[frozenset[str]] = frozenset(
        {"max_minutes", "checkpoint_every", "log_every"}
    )

    def validate(self) -> None:
        for name in ("steps", "checkpoint_every", "log_every", "probe_steps", "max_accumulation"):
            check_int(name, getattr(self, name), minimum=1)
        if not isinstance(self.fit_budget, bool):
            raise ValueError(f"fit_budget={self.fit_budget!r} is invalid; use true or false")
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
class BudgetPlan:
    """How a run under ``max_minutes`` was sized once its first steps were timed.

    Steps before ``from_step`` ran one ``step_fn`` call each; from ``from_step`` on, each
    optimizer step makes ``accumulation`` calls. The schedule spans ``steps`` optimizer steps
    (at most the config's) with ``warmup_steps`` of warm-up (scaled with the steps).
    """

    from_step: int
    steps: int
    warmup_steps: int
    accumulation: int
    seconds_per_call: float  # measured over the probe; mean over ranks
    budget_s: float  # the budget the plan was sized for

    def calls(self, step: int) -> range:
        """The ``step_fn`` call indices of the 0-based optimizer ``step``."""
        if step < self.from_step:
            return range(step, step + 1)
        first = self.from_step + (step - self.from_step) * self.accumulation
        return range(first, first + self.accumulation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_budget(
    config: TrainingConfig, *, step: int, elapsed_s: float, seconds_per_call: float
) -> BudgetPlan:
    """Size the rest of a budgeted run at optimizer ``step``, ``elapsed_s`` into it.

    The time left (less ``BUDGET_MARGIN``) buys ``calls`` more calls at ``seconds_per_call``.
    When that is at least twice the steps still asked for, they keep their number and each
    gets ``min(max_accumulation, calls // steps_left)`` calls; otherwise the run ends after
    ``calls`` more single-call steps (none when no time is left).
    """
    if config.max_minutes is None:
        raise ValueError("plan_budget needs a config with max_minutes")
    budget = 60 * config.max_minutes
    left = max(0.0, budget - elapsed_s) * (1 - BUDGET_MARGIN)
    calls = int(left / seconds_per_call) if seconds_per_call > 0 else 2**31
    wanted = config.steps - step
    accumulation = 1
    if wanted > 0 and calls >= 2 * wanted:
        accumulation = min(config.max_accumulation, calls // wanted)
    steps = config.steps if accumulation > 1 else step + min(wanted, calls)
    warmup = min(config.warmup_steps, math.ceil(config.warmup_steps * steps / config.steps))
    return BudgetPlan(
        from_step=step,
        steps=steps,
        warmup_steps=warmup,
        accumulation=accumulation,
        seconds_per_call=seconds_per_call,
        budget_s=budget,
    )


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
    calls_done: int  # step_fn calls behind steps_done (more than steps under accumulation)
    plan: BudgetPlan | None  # how the budget sized the run; None without one

    def budget(self) -> dict[str, Any] | None:
        """What a stage report records of the budget: the plan and how it ended."""
        if self.plan is None:
            return None
        return self.plan.to_dict() | {"stopped_by_time": self.stopped_by_time}


def lr_factor(
    config: TrainingConfig, step: int, elapsed_s: float, plan: BudgetPlan | None = None
) -> float:
    """Multiplier of ``lr`` at the 0-based optimizer ``step``, ``elapsed_s`` into the run.

    Linear warm-up, then the decay to ``min_lr_ratio`` over the plan's steps when there is
    a plan, else over the config's; without a plan but with ``max_minutes``, the decay runs
    to whichever end comes first, the last step or the time limit.
    """
    steps, warmup = (plan.steps, plan.warmup_steps) if plan else (config.steps, config.warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = (step - warmup) / span
    if config.max_minutes is not None and plan is None:
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
    clock: Clock = time.monotonic,
) -> TrainReport:
    """Train ``model`` in place for ``config.steps`` steps of ``step_fn`` (or until the budget).

    ``names`` names the metrics ``step_fn`` returns (``"loss"`` first). With a
    ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps and at the
    end, and a run resumes from the newest one found there (and the budget plan saved with
    it). The model is left in training mode; the caller restores the mode it wants. torch's
    global RNG state is restored. ``clock`` times the run and its budget.

    Raises:
        CheckpointMismatchError: ``checkpoint_dir`` holds a run with another config or data.
        IntegrityError: a checkpoint file does not match its recorded sha256.
    """
    ctx = dist or Dist.single()
    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        return _Loop(
            model,
            step_fn,
            config,
            names=tuple(names),
            digests={"config_digest": config.digest(), "data_digest": data_digest},
            stage=stage,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            ctx=ctx,
            clock=clock,
        ).run()


class _Loop:
    """One ``train_`` call: the optimizer, the budget plan and the clock's phases.

    A phase is the stretch of steps one mean step time describes: the probe, then the
    plan's steps (which may accumulate several calls each)."""

    def __init__(
        self,
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
        clock: Clock,
    ) -> None:
        self.model, self.step_fn, self.config = model, step_fn, config
        self.names, self.digests, self.stage = names, digests, stage
        self.checkpoint_dir, self.progress, self.ctx, self.clock = (
            checkpoint_dir,
            progress,
            ctx,
            clock,
        )
        self.started = clock()
        self.optimizer = torch.optim.AdamW(
            parameter_groups(model, config.weight_decay), lr=config.lr
        )
        self.plan: BudgetPlan | None = None

    def run(self) -> TrainReport:
        config, ctx = self.config, self.ctx
        resumed = None
        if self.checkpoint_dir is not None:
            resumed = load_checkpoint(
                self.checkpoint_dir, self.model, self.optimizer, config, digests=self.digests
            )
            if resumed is not None:
                self.plan = _load_plan(self.checkpoint_dir, self.digests)
        ctx.barrier()  # every rank has read the checkpoint before rank 0 may replace it
        net = ctx.wrap(self.model)
        self.model.train()
        history: list[tuple[float, ...]] = []
        window: list[torch.Tensor] = []
        stopped = False
        step = start = resumed or 0
        phase_started, phase_steps, warm_at = self.clock(), 0, None
        while step < self._last_step() and not stopped:
            lr = config.lr * lr_factor(config, step, self.clock() - self.started, self.plan)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            stats = self._accumulate(net, step)
            grad_norm = _clip(self.model, config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            phase_steps += 1
            now = self.clock()
            late = _out_of_time(config, self.started, phase_started, now, phase_steps)
            stats, stopped = ctx.reduce(stats.detach(), late)
            history.append(tuple(float(x) for x in stats))
            window.append(stats)
            if warm_at is None:
                warm_at = now  # the first step warms caches and kernels: not timed
            elif self._probe_done(step - start, stopped):
                self._make_plan(step, now, seconds_per_call=(now - warm_at) / config.probe_steps)
                phase_started, phase_steps = now, 0
            self._checkpoint(step, stopped)
            if step % config.log_every == 0 or step == self._last_step() or stopped:
                mean = torch.stack(window).mean(0).tolist()
                metrics = dict(zip(self.names, mean, strict=True)) | {"lr": lr}
                if config.max_grad_norm is not None:
                    metrics["grad_norm"] = grad_norm
                window.clear()
                _report(
                    self.stage,
                    step=step,
                    steps=self._last_step(),
                    elapsed_s=now - self.started,
                    metrics=metrics,
                    ctx=ctx,
                    progress=self.progress,
                )
        if stopped:
            log.warning(
                "%s stopped by its %.1f-minute budget after step %d of %d",
                self.stage,
                config.max_minutes,
                step,
                self._last_step(),
            )
        ctx.barrier()
        return TrainReport(
            steps_done=step,
            steps_run=step - start,
            resumed_from_step=resumed,
            history=tuple(history),
            seconds=self.clock() - self.started,
            stopped_by_time=stopped,
            world_size=ctx.world_size,
            rank=ctx.rank,
            calls_done=sum(len(self._calls(s)) for s in range(step)),
            plan=self.plan,
        )

    def _last_step(self) -> int:
        return self.plan.steps if self.plan is not None else self.config.steps

    def _calls(self, step: int) -> range:
        return self.plan.calls(step) if self.plan is not None else range(step, step + 1)

    def _accumulate(self, net: nn.Module, step: int) -> torch.Tensor:
        """Run the step's calls; gradients and metrics are their means."""
        calls = self._calls(step)
        stats = []
        for index in calls:
            torch.manual_seed(derive_seed(self.config.seed, "step", index))  # dropout etc.
            stats.append(self.step_fn(net, index).detach())
        if len(calls) > 1:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(len(calls))
        return torch.stack(stats).mean(0)

    def _probe_done(self, steps_run: int, stopped: bool) -> bool:
        config = self.config
        return (
            config.max_minutes is not None
            and config.fit_budget
            and self.plan is None
            and not stopped
            and steps_run == config.probe_steps + 1
        )

    def _make_plan(self, step: int, now: float, *, seconds_per_call: float) -> None:
        """Size the rest of the run from the probe (the same plan on every rank)."""
        mean, _ = self.ctx.reduce(torch.tensor([seconds_per_call]), False)
        self.plan = plan_budget(
            self.config, step=step, elapsed_s=now - self.started, seconds_per_call=float(mean)
        )
        log.info("%s budget plan: %s", self.stage, json.dumps(self.plan.to_dict()))
        if self.checkpoint_dir is not None and self.ctx.rank == 0:
            _save_plan(self.checkpoint_dir, self.plan, self.digests)

    def _checkpoint(self, step: int, stopped: bool) -> None:
        config = self.config
        due = step % config.checkpoint_every == 0 or step == self._last_step() or stopped
        if self.checkpoint_dir is None or not due:
            return
        if self.ctx.rank == 0:
            save_checkpoint(
                self.checkpoint_dir,
                self.model,
                self.optimizer,
                config,
                step=step,
                digests=self.digests,
                world_size=self.ctx.world_size,
            )
        self.ctx.barrier()


def _save_plan(checkpoint_dir: Path, plan: BudgetPlan, digests: Mapping[str, str]) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / f".{_PLAN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({**digests, "plan": plan.to_dict()}, indent=2, sort_keys=True))
    os.replace(tmp, checkpoint_dir / _PLAN_FILE)


def _load_plan(checkpoint_dir: Path, digests: Mapping[str, str]) -> BudgetPlan | None:
    """The plan saved with this run's checkpoints, or None (none, or another run's)."""
    path = checkpoint_dir / _PLAN_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if any(saved.get(key) != value for key, value in digests.items()):
        return None
    return BudgetPlan(**saved["plan"])


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
    config: TrainingConfig, started: float, phase_started: float, now: float, phase_steps: int
) -> bool:
    """Whether another step, as long as the mean step of this phase, would overrun the budget."""
    if config.max_minutes is None:
        return False
    mean_step = (now - phase_started) / max(1, phase_steps)
    return now - started + mean_step > config.max_minutes * 60


def _clip(model: nn.Module, max_norm: float | None) -> float:
    if max_norm is None:
        return math.nan
    params = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
