"""Knowledge distillation of a causal LM (student) from another (teacher), in place.

loss = alpha * T² * KL(teacher_T ‖ student_T) + (1 - alpha) * CE(student, next token)

One function, `distill_`, runs in a single process or, unchanged, under
``torchrun --nproc-per-node N`` with DistributedDataParallel (gloo on CPU, nccl on CUDA).
``batch_size`` is the *global* micro-batch: each rank takes its slice, so N ranks compute the
same update as one process (up to float rounding). A process group is created (and destroyed
at the end) when none exists and ``WORLD_SIZE`` > 1: the one environment read in the package,
because torchrun's contract is its environment.

Checkpoints hold no pickle: ``<checkpoint_dir>/step-00000042/`` has ``student.safetensors``,
``optimizer.safetensors`` (AdamW tensors, flattened) and ``state.json`` (step, param groups,
digests of the config, the data and both tensor files). A directory appears by one rename of a
complete, fsynced temporary directory. The data order and every random draw are functions of
``(seed, step)``, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn

from slimserve.compression.errors import CompressionError
from slimserve.registry.errors import IntegrityError
from slimserve.registry.store import sha256_file

if TYPE_CHECKING:
    from slimserve.compression.data import Tokenizer

log = logging.getLogger(__name__)

CONFIG_VERSION = 1
CHECKPOINT_FORMAT = 1
_STUDENT_FILE = "student.safetensors"
_OPTIMIZER_FILE = "optimizer.safetensors"
_STATE_FILE = "state.json"
_CKPT_RE = re.compile(r"^step-(\d{8})$")
# Fields that change how long or how loudly a run goes, not the weights it produces: a run
# stopped by its time budget may resume with a larger one.
_NON_TRAJECTORY_FIELDS = frozenset({"max_minutes", "checkpoint_every", "log_every"})

Progress = Callable[[int, int, dict[str, float]], None]


class CheckpointMismatchError(CompressionError, ValueError):
    """A checkpoint directory holds a run made with another config or other data."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DistillConfig:
    """How to distill. ``batch_size`` is global (split across DDP ranks); lr is AdamW's peak."""

    version: int = CONFIG_VERSION
    steps: int = 100  # optimizer steps
    batch_size: int = 4  # sequences per micro-batch, all ranks together
    seq_len: int = 128  # tokens per sequence; must equal the batches' width
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.0  # applied to matrices only, never to norms or biases
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    decay: Literal["cosine", "linear"] = "cosine"  # after warmup, down to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0  # None: no clipping
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs cross-entropy
    # Forward passes under torch.autocast(bfloat16); weights, grads and AdamW stay fp32.
    # On an AVX512-BF16 CPU this saved ~30% CPU time a step with the same loss (SmolLM2-135M).
    autocast_bf16: bool = False
    # Wall-clock budget of one call: the run stops (checkpointed, and says so) before a step
    # that would likely overrun it, judged by the mean step so far.
    max_minutes: float | None = None
    checkpoint_every: int = 50  # steps; a checkpoint is also written at the end
    seed: int = 0
    log_every: int = 10  # steps

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"DistillConfig version {self.version!r} is not supported; use {CONFIG_VERSION}"
            )
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("seq_len", self.seq_len, minimum=2)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; "
                "use at most steps warmup steps"
            )
        _check_float("lr", self.lr, low=0.0, low_open=True)
        _check_float("weight_decay", self.weight_decay, low=0.0)
        _check_float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _check_float("temperature", self.temperature, low=0.0, low_open=True)
        _check_float("alpha", self.alpha, low=0.0, high=1.0)
        if self.max_grad_norm is not None:
            _check_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        if self.max_minutes is not None:
            _check_float("max_minutes", self.max_minutes, low=0.0, low_open=True)
        if not isinstance(self.autocast_bf16, bool):
            raise ValueError(f"autocast_bf16={self.autocast_bf16!r} is invalid; use true or false")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay={self.decay!r} is not known; use 'cosine' or 'linear'")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistillConfig:
        """Build from `to_dict` output; raises ValueError naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown DistillConfig key(s) {unknown}; allowed keys are {sorted(known)}"
            )
        return cls(**data)

    def digest(self) -> str:
        """sha256 of the fields that decide the trained weights (not budget or logging)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in _NON_TRAJECTORY_FIELDS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; use an integer >= {minimum}")


def _check_float(
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
) -> None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        upper = f" and <= {high}" if math.isfinite(high) else ""
        raise ValueError(f"{name}={value!r} is invalid; use a finite number {bound}{upper}")


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


def lr_at(step: int, config: DistillConfig) -> float:
    """Learning rate for the optimizer step with 0-based index `step`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape)


def derive_seed(seed: int, tag: str, index: int) -> int:
    """A 63-bit seed for draw `index` of kind `tag`, independent of any other draw."""
    raw = hashlib.sha256(f"{seed}:{tag}:{index}".encode()).digest()
    return int.from_bytes(raw[:8], "big") & (2**63 - 1)


def sample_indices(n: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Positions [start, start+count) of an endless stream of seeded permutations of range(n)."""
    parts: list[torch.Tensor] = []
    pos, end = start, start + count
    while pos < end:
        epoch, offset = divmod(pos, n)
        gen = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
        perm = torch.randperm(n, generator=gen)
        take = min(n - offset, end - pos)
        parts.append(perm[offset : offset + take])
        pos += take
    return torch.cat(parts)


@dataclass(frozen=True, slots=True)
class _Dist:
    rank: int
    world_size: int
    created: bool  # we initialised the process group, so we destroy it


def _init_distributed(device: torch.device) -> _Dist:
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), created=False)
    # torchrun's contract is its environment; init_process_group("env://") reads the rest.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or not dist.is_available():
        return _Dist(0, 1, created=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), created=True)


def _barrier(ctx: _Dist) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def data_digest(batches: torch.Tensor) -> str:
    """sha256 of the token ids with their shape and dtype."""
    h = hashlib.sha256(f"{tuple(batches.shape)}:{batches.dtype}".encode())
    h.update(batches.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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


def _optimizer(student: nn.Module, config: DistillConfig) -> torch.optim.AdamW:
    params = [p for p in student.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


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
    resumes from the newest checkpoint found there. `progress(step, steps, metrics)` is called
    on every rank after each optimizer step (metrics: loss, kl, ce, lr, grad_norm, elapsed_s).

    Raises:
        CheckpointMismatchError: `checkpoint_dir` holds a run with another config or other data.
        IntegrityError: a checkpoint file does not match its recorded sha256.
        CompressionError: batches of the wrong shape, or a batch size that does not split
            over the ranks.
    """
    device = next(student.parameters()).device
    ctx = _init_distributed(device)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    modes = (student.training, teacher.training)
    try:
        _check_inputs(batches, config, ctx.world_size)
        with torch.random.fork_rng(devices=rng_devices):
            return _train(
                student,
                teacher,
                batches,
                config,
                ctx=ctx,
                checkpoint_dir=checkpoint_dir,
                progress=progress,
            )
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
        if ctx.created:
            dist.destroy_process_group()


def _train(
    student: nn.Module,
    teacher: nn.Module,
    batches: torch.Tensor,
    config: DistillConfig,
    *,
    ctx: _Dist,
    checkpoint_dir: Path | None,
    progress: Progress | None,
) -> DistillReport:
    started = time.monotonic()
    optimizer = _optimizer(student, config)
    digests = {"config_digest": config.digest(), "data_digest": data_digest(batches)}
    resumed = None
    if checkpoint_dir is not None:
        resumed = load_checkpoint(checkpoint_dir, student, optimizer, config, digests=digests)
    _barrier(ctx)  # every rank has read the checkpoint before rank 0 may replace it
    model = _wrap(student, ctx)
    student.train()
    teacher.eval()
    losses: list[float] = []
    last = torch.full((3,), math.nan)
    stopped = False
    step = start = resumed or 0
    loop_started = time.monotonic()
    while step < config.steps and not stopped:
        torch.manual_seed(derive_seed(config.seed, "step", step))  # dropout etc. per step
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = _accumulate(model, teacher, batches, config, ctx=ctx, step=step)
        grad_norm = _clip(student, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        now = time.monotonic()
        last, stopped = _reduce(
            sums, _out_of_time(config, started, loop_started, now, step - start), ctx
        )
        losses.append(float(last[0]))
        if checkpoint_dir is not None and _checkpoint_due(config, step, stopped):
            if ctx.rank == 0:
                save_checkpoint(
                    checkpoint_dir,
                    student,
                    optimizer,
                    config,
                    step=step,
                    digests=digests,
                    world_size=ctx.world_size,
                )
            _barrier(ctx)
        metrics = {"loss": float(last[0]), "kl": float(last[1]), "ce": float(last[2]), "lr": lr}
        metrics |= {"grad_norm": grad_norm, "elapsed_s": now - started}
        if ctx.rank == 0 and (step % config.log_every == 0 or step == config.steps):
            log.info("distill step %d/%d %s", step, config.steps, _fmt(metrics))
        if progress is not None:
            progress(step, config.steps, metrics)
    if stopped:
        log.warning(
            "distillation stopped by its %.1f-minute budget after step %d of %d",
            config.max_minutes,
            step,
            config.steps,
        )
    _barrier(ctx)
    return DistillReport(
        steps_done=step,
        steps_run=step - start,
        resumed_from_step=resumed,
        final_loss=float(last[0]),
        final_kl=float(last[1]),
        final_ce=float(last[2]),
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
        losses=tuple(losses),
        tokens_seen=step * config.batch_size * config.grad_accum * config.seq_len,
        seconds=time.monotonic() - started,
        stopped_by_time=stopped,
        world_size=ctx.world_size,
        rank=ctx.rank,
    )


def _wrap(student: nn.Module, ctx: _Dist) -> nn.Module:
    """The module to call forward on: DDP around the student when there are several ranks."""
    if ctx.world_size == 1:
        return student
    index = next(student.parameters()).device.index
    return nn.parallel.DistributedDataParallel(
        student,
        device_ids=None if index is None else [index],  # None on CPU
    )


def _out_of_time(
    config: DistillConfig, started: float, loop_started: float, now: float, steps_run: int
) -> bool:
    """Whether another step, as long as the mean step so far, would overrun the budget."""
    if config.max_minutes is None:
        return False
    mean_step = (now - loop_started) / steps_run
    return now - started + mean_step > config.max_minutes * 60


def _checkpoint_due(config: DistillConfig, step: int, stopped: bool) -> bool:
    return step % config.checkpoint_every == 0 or step == config.steps or stopped


def _accumulate(
    model: nn.Module,
    teacher: nn.Module,
    batches: torch.Tensor,
    config: DistillConfig,
    *,
    ctx: _Dist,
    step: int,
) -> torch.Tensor:
    """Forward/backward over one step's micro-batches; returns summed [loss, kl, ce] / accum."""
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
        with _grad_sync(model, last_micro=micro == config.grad_accum - 1):
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


def _grad_sync(model: nn.Module, *, last_micro: bool) -> contextlib.AbstractContextManager[object]:
    """DDP all-reduces gradients only on the last micro-batch of a step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last_micro:
        return model.no_sync()
    return contextlib.nullcontext()


def _clip(student: nn.Module, max_norm: float | None) -> float:
    params = [p for p in student.parameters() if p.grad is not None]
    if max_norm is None:
        return math.nan
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _reduce(sums: torch.Tensor, out_of_time: bool, ctx: _Dist) -> tuple[torch.Tensor, bool]:
    """Mean [loss, kl, ce] over ranks, and whether any rank ran out of time."""
    stats = torch.cat([sums, torch.tensor([float(out_of_time)])])
    if ctx.world_size > 1:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        stats = stats.to(backend_device)
        dist.all_reduce(stats)
        stats = stats.cpu()
        stats[:3] /= ctx.world_size
    return stats[:3], bool(stats[3] > 0)


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


# --- checkpoints -------------------------------------------------------------------------


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete ``step-NNNNNNNN`` directory, or None."""
    if not checkpoint_dir.is_dir():
        return None
    found = [
        p
        for p in checkpoint_dir.iterdir()
        if _CKPT_RE.fullmatch(p.name) and (p / _STATE_FILE).is_file()
    ]
    return max(found, key=lambda p: p.name) if found else None


def save_checkpoint(
    checkpoint_dir: Path,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: DistillConfig,
    *,
    step: int,
    digests: Mapping[str, str],
    world_size: int,
) -> Path:
    """Write ``step-NNNNNNNN/`` atomically and drop older checkpoints. Returns its path."""
    from safetensors.torch import save_file, save_model

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"step-{step:08d}"
    tmp = checkpoint_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(student, str(tmp / _STUDENT_FILE))  # stores a tied tensor once
    tensors, scalars, groups = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / _OPTIMIZER_FILE))
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        **digests,
        "config": config.to_dict(),
        "world_size": world_size,
        "param_groups": groups,
        "optimizer_scalars": scalars,
        "files": {name: sha256_file(tmp / name) for name in (_STUDENT_FILE, _OPTIMIZER_FILE)},
    }
    (tmp / _STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    for name in (_STUDENT_FILE, _OPTIMIZER_FILE, _STATE_FILE):
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(checkpoint_dir)
    for old in checkpoint_dir.iterdir():
        if old != final and _CKPT_RE.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint written: %s", final)
    return final


def load_checkpoint(
    checkpoint_dir: Path,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: DistillConfig,
    *,
    digests: Mapping[str, str],
) -> int | None:
    """Load the newest checkpoint into student and optimizer; returns its step, or None."""
    from safetensors.torch import load_file, load_model

    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    try:
        state = json.loads((path / _STATE_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"checkpoint state {path / _STATE_FILE} is not JSON: {exc}") from exc
    _check_compatible(path, state, config, digests)
    for name in (_STUDENT_FILE, _OPTIMIZER_FILE):
        if sha256_file(path / name) != state["files"].get(name):
            raise IntegrityError(f"checkpoint file {path / name} does not match its sha256")
    device = next(student.parameters()).device
    try:
        load_model(student, str(path / _STUDENT_FILE), strict=True, device=str(device))
    except RuntimeError as exc:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit this student's architecture: {exc}"
        ) from exc
    # On CPU: AdamW moves moments to each parameter's device itself, and a non-capturable
    # AdamW needs its `step` counters on the CPU.
    tensors = load_file(str(path / _OPTIMIZER_FILE))
    optimizer.load_state_dict(
        _unflatten_optimizer(tensors, state["optimizer_scalars"], state["param_groups"])
    )
    log.info("resuming distillation from %s (step %d)", path, state["step"])
    return int(state["step"])


def _check_compatible(
    path: Path, state: Mapping[str, Any], config: DistillConfig, digests: Mapping[str, str]
) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"checkpoint {path} has format {state.get('format')!r}; this version reads "
            f"{CHECKPOINT_FORMAT}. Use an empty checkpoint_dir."
        )
    if state["config_digest"] != digests["config_digest"]:
        saved, now = state.get("config", {}), config.to_dict()
        changed = sorted(
            f"{k}: {saved.get(k)!r} -> {now[k]!r}"
            for k in now
            if k not in _NON_TRAJECTORY_FIELDS and saved.get(k) != now[k]
        )
        raise CheckpointMismatchError(
            f"checkpoint {path} was made with a different DistillConfig ({', '.join(changed)}); "
            "use the same config to resume, or another (or empty) checkpoint_dir to start over"
        )
    if state["data_digest"] != digests["data_digest"]:
        raise CheckpointMismatchError(
            f"checkpoint {path} was made on different training batches; pass the same batches "
            "to resume, or use another (or empty) checkpoint_dir to start over"
        )


def _flatten_optimizer(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    """Split an optimizer state_dict into named tensors, JSON scalars and param groups."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            name = f"{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous()
            else:
                scalars[name] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        for group in state_dict["param_groups"]
    ]
    return tensors, scalars, groups


def _unflatten_optimizer(
    tensors: Mapping[str, torch.Tensor],
    scalars: Mapping[str, Any],
    groups: list[dict[str, Any]],
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *scalars.items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    param_groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in groups
    ]
    return {"state": state, "param_groups": param_groups}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- teacher-generated data --------------------------------------------------------------


def teacher_generate_batches(
    teacher: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    seq_len: int,
    n: int,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> torch.Tensor:
    """Sample `n` sequences (n, seq_len) int64: a prompt, then the teacher's continuation.

    Row i continues ``prompts[i % len(prompts)]`` (cut to seq_len - 1 tokens). Sampling uses
    its own generator seeded with `seed` and never stops early: the end-of-sequence token
    (when the tokenizer has one) is never drawn, so every row is full length.
    """
    if not prompts or n < 1 or seq_len < 2 or temperature <= 0 or batch_size < 1:
        raise ValueError(
            f"need prompts (got {len(prompts)}), n >= 1 (got {n}), seq_len >= 2 "
            f"(got {seq_len}), temperature > 0 (got {temperature}), batch_size >= 1"
        )
    encoded = [tokenizer.encode(p, add_special_tokens=True)[: seq_len - 1] for p in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompts {empty} encode to no tokens; pass non-empty prompts")
    eos = getattr(tokenizer, "eos_token_id", None)
    out = torch.empty((n, seq_len), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    was_training = teacher.training
    teacher.eval()
    try:
        for p_index, prompt_ids in enumerate(encoded):
            rows = list(range(p_index, n, len(prompts)))
            for chunk in _chunks(rows, batch_size):
                ids = torch.tensor([prompt_ids] * len(chunk), dtype=torch.long)  # (rows, P)
                out[chunk] = _sample(
                    teacher, ids, seq_len=seq_len, gen=gen, temperature=temperature, eos=eos
                )
    finally:
        teacher.train(was_training)
    return out


def _chunks(rows: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


@torch.no_grad()
def _sample(
    teacher: nn.Module,
    ids: torch.Tensor,
    *,
    seq_len: int,
    gen: torch.Generator,
    temperature: float,
    eos: int | None,
) -> torch.Tensor:
    device = next(teacher.parameters()).device
    pieces = [ids]
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns).
    params = inspect.signature(teacher.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"
    out = teacher(input_ids=ids.to(device), use_cache=True, logits_to_keep=1)
    for pos in range(ids.shape[1], seq_len):
        logits = out.logits[:, -1].float().cpu() / temperature  # (count, vocab)
        if eos is not None and 0 <= eos < logits.shape[-1]:
            logits[:, eos] = -math.inf
        token = torch.multinomial(logits.softmax(-1), 1, generator=gen)  # (count, 1)
        pieces.append(token)
        if pos + 1 < seq_len:
            cache = {cache_name: getattr(out, cache_name)}
            out = teacher(input_ids=token.to(device), use_cache=True, **cache)
    return torch.cat(pieces, dim=1)
