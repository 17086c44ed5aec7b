"""Knowledge distillation of a causal LM (student) from another (teacher), in place.

loss = alpha * T² * KL(teacher_T ‖ student_T) + (1 - alpha) * CE(student, next token)

``distill_`` runs in a single process or, unchanged, under ``torchrun --nproc-per-node N``
with DistributedDataParallel (gloo on CPU, nccl on CUDA; see ``.distributed``).
``batch_size`` is the *global* micro-batch: each rank takes its slice, so N ranks compute the
same update as one process (up to float rounding). The optimisation itself (schedule, time
budget, clipping, checkpoints, resume) is ``.training``'s loop; this module supplies the
loss and one step's forward and backward passes. As a recipe stage (``distill``) the parent
is the teacher and the run's text the data.

Imports ``.data``, ``.distill_data``, ``.distributed``, ``.errors``, ``.stage``, ``.training``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from slimserve.compression.distill_data import data_digest, distill_batches, sample_indices
from slimserve.compression.distributed import Dist, grad_sync, init_distributed
from slimserve.compression.errors import CompressionError
from slimserve.compression.progress import Progress
from slimserve.compression.stage import (
    StageContext,
    StageOutcome,
    StageSpec,
    check_choice,
    check_float,
    check_int,
)
from slimserve.compression.teacher_data import TeacherTextConfig, select_prompts
from slimserve.compression.training import TrainingConfig, train_

log = logging.getLogger(__name__)

DistillData = Literal["text", "teacher"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DistillConfig(TrainingConfig):
    """How to distill. ``batch_size`` is global (split across DDP ranks).

    Version 2: weight decay no longer applies to embeddings, and under ``max_minutes`` the
    learning rate anneals by the clock too (``.training``); version 1 tables load unchanged.
    """

    version: int = 2
    OLD_VERSIONS: ClassVar[frozenset[int]] = frozenset({1})  # same keys
    batch_size: int = 4  # sequences per micro-batch, all ranks together
    seq_len: int = 128  # tokens per sequence; must equal the batches' width
    grad_accum: int = 1  # micro-batches per optimizer step
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs cross-entropy
    # Forward passes under torch.autocast(bfloat16); weights, grads and AdamW stay fp32.
    # On an AVX512-BF16 CPU this saved ~30% CPU time a step with the same loss (SmolLM2-135M).
    autocast_bf16: bool = False
    # What the student reads: "text" is the run's text (--data, else the built-in pydoc
    # text); "teacher" is the parent's own answers to the shipped prompts (made once and kept
    # in the registry, see .teacher_data), with `text_share` of the sequences taken from the
    # run's text. Text of one domain alone makes the student forget the rest.
    data: DistillData = "text"
    teacher_prompts: int = 0  # the first N shipped prompts; 0 = all of them
    teacher_new_tokens: int = 192  # most tokens the teacher writes per prompt
    text_share: float = 0.25  # with data = "teacher": share of sequences from the run's text

    def validate(self) -> None:
        TrainingConfig.validate(self)
        for name in ("batch_size", "grad_accum"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("seq_len", self.seq_len, minimum=2)
        check_float("temperature", self.temperature, low=0.0, low_open=True)
        check_float("alpha", self.alpha, low=0.0, high=1.0)
        if not isinstance(self.autocast_bf16, bool):
            raise ValueError(f"autocast_bf16={self.autocast_bf16!r} is invalid; use true or false")
        check_choice("data", self.data, get_args(DistillData))
        check_int("teacher_prompts", self.teacher_prompts, minimum=0)
        check_int("teacher_new_tokens", self.teacher_new_tokens, minimum=1)
        check_float("text_share", self.text_share, low=0.0, high=0.9)

    def teacher_text(self) -> TeacherTextConfig:
        """The teacher text this config asks for (sampling as ``TeacherTextConfig``'s)."""
        return TeacherTextConfig(
            prompts=self.teacher_prompts, max_new_tokens=self.teacher_new_tokens
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DistillReport:
    """What a `distill_` call did. Losses are global means over ranks and micro-batches."""

    steps_done: int  # optimizer steps completed, counting those before a resume
    steps_run: int  # optimizer steps taken in this call
    resumed_from_step: int | None  # step of the checkpoint this call started from
    final_loss: float  # nan when no step ran
    final_kl: float
    final_ce: float
    mean_loss: float  # over this call's steps
    losses: tuple[float, ...]  # per step of this call
    tokens_seen: int  # all ranks, counting those before a resume
    seconds: float  # wall clock of this call
    stopped_by_time: bool
    world_size: int
    rank: int  # this process's rank; 0 without DDP
    # What the batches came from (text name and sha256, teacher dataset, sequences of each);
    # filled in by the stage.
    data: Mapping[str, Any] = field(default_factory=dict)
    #: How a `max_minutes` budget was planned (steps, accumulation; None without one).
    budget: Mapping[str, Any] | None = None
    #: Whether the forward passes ran under bf16 autocast (asked for, and the CPU pays).
    autocast_bf16: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The summary a manifest records (per-step losses stay in the logs)."""
        return {
            "steps_done": self.steps_done,
            "final_loss": self.final_loss,
            "seconds": self.seconds,
            "stopped_by_time": self.stopped_by_time,
            "resumed_from_step": self.resumed_from_step,
            "tokens_seen": self.tokens_seen,
            "autocast_bf16": self.autocast_bf16,
            "budget": dict(self.budget) if self.budget is not None else None,
            "data": dict(self.data),
        }


class KDLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    kl: torch.Tensor  # scalar, per-token KL(teacher_T ‖ student_T)
    ce: torch.Tensor  # scalar, next-token cross-entropy of the student


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> KDLoss:
    """Distillation loss on (B, T, vocab) logits for (B, T) token ids, computed in fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise CompressionError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: teacher and student need the same vocabulary"
        )
    vocab = student_logits.shape[-1]
    s = student_logits.float()
    t = teacher_logits.float()
    s_logp = F.log_softmax(s / temperature, dim=-1).reshape(-1, vocab)  # (B*T, vocab)
    t_logp = F.log_softmax(t / temperature, dim=-1).reshape(-1, vocab)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(s[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return KDLoss(loss, kl.detach(), ce.detach())


def distill_(
    student: nn.Module,
    teacher: nn.Module,
    batches: torch.Tensor,
    config: DistillConfig,
    *,
    checkpoint_dir: Path | None,
    progress: Progress | None = None,
) -> DistillReport:
    """Train `student` in place to match `teacher` on `batches` (N, seq_len) token ids.

    Both models must live on one device and share a vocabulary. With a `checkpoint_dir`, a
    checkpoint is written every `config.checkpoint_every` steps and at the end, and a run
    resumes from the newest checkpoint found there. `progress` gets a ``"distill"`` event on
    every rank every `log_every` steps and after the last (metrics: loss, kl, ce, lr,
    grad_norm). Both models' training modes are restored.

    Raises:
        CheckpointMismatchError: `checkpoint_dir` holds a run with another config or other data.
        IntegrityError: a checkpoint file does not match its recorded sha256.
        CompressionError: batches of the wrong shape, or a batch size that does not split
            over the ranks.
    """
    ctx = init_distributed(next(student.parameters()).device)
    modes = (student.training, teacher.training)
    try:
        _check_inputs(batches, config, ctx.world_size)
        teacher.eval()
        step = functools.partial(_step, teacher=teacher, batches=batches, config=config, ctx=ctx)
        run = train_(
            student,
            step,
            config,
            names=("loss", "kl", "ce"),
            data_digest=data_digest(batches),
            stage="distill",
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            dist=ctx,
        )
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
        ctx.close()
    losses = [h[0] for h in run.history]
    last = run.history[-1] if run.history else (math.nan,) * 3
    return DistillReport(
        steps_done=run.steps_done,
        steps_run=run.steps_run,
        resumed_from_step=run.resumed_from_step,
        final_loss=last[0],
        final_kl=last[1],
        final_ce=last[2],
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
        losses=tuple(losses),
        # Calls, not optimizer steps: a budget plan may accumulate several per step.
        tokens_seen=run.calls_done * config.batch_size * config.grad_accum * config.seq_len,
        seconds=run.seconds,
        stopped_by_time=run.stopped_by_time,
        world_size=run.world_size,
        rank=run.rank,
        budget=run.budget(),
        autocast_bf16=config.autocast_bf16 and bf16_pays(next(student.parameters()).device),
    )


def _check_inputs(batches: torch.Tensor, config: DistillConfig, world_size: int) -> None:
    if batches.ndim != 2 or batches.shape[1] != config.seq_len:
        raise CompressionError(
            f"batches have shape {tuple(batches.shape)}; expected (N, seq_len={config.seq_len})"
        )
    if batches.dtype not in (torch.int64, torch.int32):
        raise CompressionError(f"batches have dtype {batches.dtype}; expected int64 token ids")
    if batches.shape[0] == 0:
        raise CompressionError("batches is empty; pass at least one sequence")
    if config.batch_size % world_size:
        raise CompressionError(
            f"batch_size={config.batch_size} does not split over {world_size} ranks; "
            f"use a multiple of {world_size}"
        )


def _step(
    model: nn.Module,
    step: int,
    *,
    teacher: nn.Module,
    batches: torch.Tensor,
    config: DistillConfig,
    ctx: Dist,
) -> torch.Tensor:
    """Forward/backward over one step's micro-batches; returns [loss, kl, ce] / accum."""
    device = next(model.parameters()).device
    teacher_device = next(teacher.parameters()).device
    per_rank = config.batch_size // ctx.world_size
    sums = torch.zeros(3)
    for micro in range(config.grad_accum):
        start = (step * config.grad_accum + micro) * config.batch_size
        rows = sample_indices(batches.shape[0], config.seed, start, config.batch_size)
        ids = batches[rows[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]].long()  # (b, T)
        with torch.no_grad(), _autocast(teacher_device, config):
            teacher_logits = teacher(input_ids=ids.to(teacher_device), use_cache=False).logits
        ids = ids.to(device)
        with grad_sync(model, last_micro=micro == config.grad_accum - 1):
            with _autocast(device, config):
                student_logits = model(input_ids=ids, use_cache=False).logits  # (b, T, vocab)
            out = kd_loss(
                student_logits,
                teacher_logits.to(device),
                ids,
                temperature=config.temperature,
                alpha=config.alpha,
            )
            torch.autograd.backward(out.loss / config.grad_accum)
        sums += torch.stack([out.loss.detach(), out.kl, out.ce]).cpu() / config.grad_accum
    return sums


def _autocast(device: torch.device, config: DistillConfig) -> torch.autocast:
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=config.autocast_bf16 and bf16_pays(device)
    )


@functools.cache
def bf16_pays(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are native here. On x86 CPUs without AVX-512 BF16/AMX (or
    AVX-NE-CONVERT) oneDNN emulates them, and a recipe asking for bf16 autocast would run
    several times slower than float32; it then runs in float32 and says so once."""
    if device.type != "cpu":
        return True
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not native:
        log.warning("this CPU has no native bfloat16: autocast_bf16 is ignored (float32)")
    return native


def run_distill(
    model: Any, tokenizer: Any, config: DistillConfig, ctx: StageContext
) -> StageOutcome:
    """The ``distill`` stage: the parent teaches, on the run's text or its own answers."""
    teacher = ctx.load_parent()
    teacher.requires_grad_(False)
    tt = config.teacher_text() if config.data == "teacher" else None
    batches, record = distill_batches(
        tokenizer,
        ctx,
        seq_len=config.seq_len,
        count=config.steps * config.batch_size,
        teacher_text=tt,
        text_share=config.text_share,
        teacher=teacher,
    )
    report = distill_(
        model, teacher, batches, config, checkpoint_dir=ctx.work_dir, progress=ctx.progress
    )
    return StageOutcome(model=model, report=replace(report, data=record))


def check_distill(config: DistillConfig, ctx: StageContext) -> None:
    """Teacher text needs a recipe run (a registry and a parent) and enough prompts."""
    if config.data != "teacher":
        return
    if ctx.teacher_text is None:
        raise ValueError("distill data = 'teacher' needs a recipe run (a registry and parent)")
    select_prompts(config.teacher_text())


STAGE = StageSpec(
    name="distill", config=DistillConfig, run=run_distill, order=1, check=check_distill
)
