"""Dev probe: how long one distillation step takes on this CPU, to size recipe budgets.

    .venv/bin/python scripts/probe_distill.py --model /tmp/probe/smol

Teacher = the model; student = a copy with a seeded random ``--zero`` share of every MLP's
channels zeroed (a stand-in for a pruned model). Each (threads, precision) cell runs
``distill_`` for ``--steps`` optimizer steps on pydoc text and reports the median seconds of
the steps after the first (the first pays one-off allocation), the process CPU seconds per
step (all threads; it does not grow when other jobs share the cores, wall time does),
tokens/s, the loss of the
first step (same weights and data in every cell, so the bf16 figure shows autocast's error)
and whether every loss was finite. Also times the teacher's forward alone.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from slimserve.compression.data import pydoc_topics, token_chunks
from slimserve.compression.distill import DistillConfig, distill_
from slimserve.compression.progress import ProgressEvent


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeConfig:
    model: str
    batch_size: int
    seq_len: int
    steps: int
    zero: float
    threads: tuple[int, ...]
    precisions: tuple[str, ...]


def parse_args() -> ProbeConfig:
    p = argparse.ArgumentParser(description="Seconds per distillation step on this CPU.")
    p.add_argument("--model", default="/tmp/probe/smol", help="Hugging Face model directory")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steps per cell; the first is warm-up")
    p.add_argument("--zero", type=float, default=0.2, help="share of MLP channels zeroed")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16-autocast"])
    a = p.parse_args()
    return ProbeConfig(
        model=a.model,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        steps=a.steps,
        zero=a.zero,
        threads=tuple(a.threads),
        precisions=tuple(a.precisions),
    )


def zero_mlp_channels_(model: PreTrainedModel, share: float, seed: int = 0) -> None:
    """Zero `share` of each MLP's intermediate channels (gate/up rows, down columns)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            width = mlp.gate_proj.out_features
            drop = torch.randperm(width, generator=gen)[: int(width * share)]
            mlp.gate_proj.weight[drop] = 0
            mlp.up_proj.weight[drop] = 0
            mlp.down_proj.weight[:, drop] = 0


def precision_context(precision: str) -> AbstractContextManager[object]:
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16-autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise SystemExit(f"unknown precision {precision!r}; use fp32 or bf16-autocast")


def time_cell(
    teacher: PreTrainedModel,
    pristine: PreTrainedModel,
    batches: torch.Tensor,
    cfg: ProbeConfig,
    precision: str,
) -> tuple[list[float], list[float], list[float]]:
    """(per-step wall seconds, per-step CPU seconds, per-step losses) of one run."""
    student = copy.deepcopy(pristine)
    config = DistillConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        lr=1e-4,
        warmup_steps=0,
        temperature=2.0,
        alpha=0.5,
        autocast_bf16=precision == "bf16-autocast",
        log_every=1,
    )
    marks: list[tuple[float, float]] = []
    losses: list[float] = []

    def progress(event: ProgressEvent) -> None:  # every step: log_every=1
        marks.append((time.perf_counter(), time.process_time()))
        losses.append(event.metrics["loss"])

    start = (time.perf_counter(), time.process_time())
    distill_(student, teacher, batches, config, checkpoint_dir=None, progress=progress)
    pairs = list(zip([start, *marks[:-1]], marks, strict=True))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs], losses


def time_teacher_forward(teacher: PreTrainedModel, batches: torch.Tensor, precision: str) -> float:
    ids = batches[:4]
    with torch.no_grad(), precision_context(precision):
        teacher(input_ids=ids, use_cache=False)  # warm-up
        start = time.perf_counter()
        teacher(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    cfg = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    pristine = copy.deepcopy(teacher)
    zero_mlp_channels_(pristine, cfg.zero)
    text = pydoc_topics("train").text
    batches = token_chunks(tokenizer, text, cfg.seq_len, cfg.batch_size * cfg.steps)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    print(
        f"batch {cfg.batch_size}x{cfg.seq_len} ({tokens_per_step} tokens/step), "
        f"{cfg.zero:.0%} MLP channels zeroed, {cfg.steps} steps per cell"
    )
    header = (
        "threads  precision       s/step  cpu-s/step  tok/s  30-min steps  teacher-fwd s"
        "  loss@1   finite"
    )
    print(header)
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        for precision in cfg.precisions:
            times, cpu, losses = time_cell(teacher, pristine, batches, cfg, precision)
            per_step = statistics.median(times[1:] or times)
            cpu_step = statistics.median(cpu[1:] or cpu)
            fwd = time_teacher_forward(teacher, batches, precision)
            finite = all(math.isfinite(x) for x in losses)
            print(
                f"{threads:>7}  {precision:<14} {per_step:7.2f} {cpu_step:11.2f}"
                f" {tokens_per_step / per_step:6.1f}"
                f"  {int(1800 / per_step):>12}  {fwd:13.2f}  {losses[0]:7.4f}  {finite}"
                f"   steps: {' '.join(f'{t:.2f}' for t in times)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
