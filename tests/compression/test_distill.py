"""Distillation: the loss falls, resume is exact, checkpoints are guarded, DDP agrees."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from slimserve.compression.checkpoint import latest_checkpoint
from slimserve.compression.distill import DistillConfig, distill_, kd_loss
from slimserve.compression.distill_data import sample_indices
from slimserve.compression.errors import CheckpointMismatchError, CompressionError
from slimserve.compression.progress import ProgressEvent
from slimserve.compression.training import lr_factor
from slimserve.registry.errors import IntegrityError
from tests.compression.ddp_distill_main import (
    SEQ_LEN,
    distill_config,
    tiny_llama,
    tiny_teacher,
    token_batches,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def teacher() -> LlamaForCausalLM:
    return tiny_teacher()


@pytest.fixture
def student() -> LlamaForCausalLM:
    return tiny_llama(seed=0)


@pytest.fixture
def batches() -> torch.Tensor:
    return token_batches(seed=3, n=64)


def _kl(student: LlamaForCausalLM, teacher: LlamaForCausalLM, ids: torch.Tensor) -> float:
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    return float(kd_loss(s, t, ids, temperature=1.0, alpha=1.0).kl)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=0, msg=name)


class _InterruptError(Exception):
    pass


def test_loss_falls_and_student_approaches_teacher(
    student: LlamaForCausalLM, teacher: LlamaForCausalLM, batches: torch.Tensor
) -> None:
    held_out = token_batches(seed=99, n=8)
    kl_before = _kl(student, teacher, held_out)
    report = distill_(student, teacher, batches, distill_config(), checkpoint_dir=None)

    assert report.steps_done == report.steps_run == 30
    assert report.resumed_from_step is None and not report.stopped_by_time
    first, last = report.losses[:3], report.losses[-3:]
    assert sum(last) / 3 < 0.85 * sum(first) / 3, report.losses
    assert _kl(student, teacher, held_out) < 0.85 * kl_before
    assert report.tokens_seen == 30 * 4 * 2 * SEQ_LEN
    assert math.isfinite(report.mean_loss) and report.final_loss == report.losses[-1]
    assert not student.training and not teacher.training  # modes restored


def test_resume_after_interruption_matches_uninterrupted_run(
    teacher: LlamaForCausalLM, batches: torch.Tensor, tmp_path: Path
) -> None:
    config = distill_config(steps=12, checkpoint_every=5, log_every=1)
    straight = tiny_llama(seed=0)
    distill_(straight, teacher, batches, config, checkpoint_dir=None)

    def stop_at_7(event: ProgressEvent) -> None:
        if event.done == 7:
            raise _InterruptError

    ckpt = tmp_path / "ckpt"
    interrupted = tiny_llama(seed=0)
    with pytest.raises(_InterruptError):
        distill_(interrupted, teacher, batches, config, checkpoint_dir=ckpt, progress=stop_at_7)
    assert latest_checkpoint(ckpt) == ckpt / "step-00000005"  # steps 6-7 are redone

    resumed = tiny_llama(seed=0)  # a fresh process would start from scratch weights
    report = distill_(resumed, teacher, batches, config, checkpoint_dir=ckpt)
    assert report.resumed_from_step == 5
    assert (report.steps_run, report.steps_done) == (7, 12)
    _assert_same_weights(_weights(resumed), _weights(straight))
    assert latest_checkpoint(ckpt) == ckpt / "step-00000012"  # older ones are dropped


def test_time_budget_stops_early_with_a_checkpoint(
    student: LlamaForCausalLM, teacher: LlamaForCausalLM, batches: torch.Tensor, tmp_path: Path
) -> None:
    config = distill_config(max_minutes=1e-9)
    report = distill_(student, teacher, batches, config, checkpoint_dir=tmp_path)
    assert report.stopped_by_time and report.steps_done == 1
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    # A larger budget is not a different run: it resumes.
    resumed = distill_(
        tiny_llama(seed=0), teacher, batches, distill_config(steps=30), checkpoint_dir=tmp_path
    )
    assert resumed.resumed_from_step == 1 and resumed.steps_done == 30


def test_checkpoint_of_another_config_or_data_is_refused(
    student: LlamaForCausalLM, teacher: LlamaForCausalLM, batches: torch.Tensor, tmp_path: Path
) -> None:
    distill_(student, teacher, batches, distill_config(steps=2), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"lr: 0\.003 -> 0\.001"):
        distill_(
            tiny_llama(seed=0),
            teacher,
            batches,
            distill_config(steps=2, lr=1e-3),
            checkpoint_dir=tmp_path,
        )
    with pytest.raises(CheckpointMismatchError, match="different training batches"):
        distill_(
            tiny_llama(seed=0),
            teacher,
            token_batches(seed=4, n=64),
            distill_config(steps=2),
            checkpoint_dir=tmp_path,
        )


def test_tampered_checkpoint_is_refused(
    teacher: LlamaForCausalLM, batches: torch.Tensor, tmp_path: Path
) -> None:
    config = distill_config(steps=2)
    distill_(tiny_llama(seed=0), teacher, batches, config, checkpoint_dir=tmp_path)
    weights = tmp_path / "step-00000002" / "student.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"student\.safetensors"):
        distill_(tiny_llama(seed=0), teacher, batches, config, checkpoint_dir=tmp_path)


def test_tied_embeddings_checkpoint_round_trips(
    teacher: LlamaForCausalLM, batches: torch.Tensor, tmp_path: Path
) -> None:
    def tied() -> LlamaForCausalLM:
        model = tiny_llama(seed=0)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        return model

    config = distill_config(steps=4, checkpoint_every=2)
    straight = tied()
    distill_(straight, teacher, batches, config, checkpoint_dir=None)
    first = tied()
    distill_(
        first,
        teacher,
        batches,
        distill_config(steps=4, checkpoint_every=2),
        checkpoint_dir=tmp_path,
    )
    saved = load_file(str(tmp_path / "step-00000004" / "student.safetensors"))
    assert len(saved) == len(list(first.parameters()))  # the tied tensor is stored once

    resumed = tied()
    distill_(resumed, teacher, batches, config, checkpoint_dir=tmp_path)
    assert resumed.lm_head.weight is resumed.model.embed_tokens.weight
    _assert_same_weights(_weights(resumed), _weights(straight))


def test_bf16_autocast_keeps_fp32_weights_and_finite_loss(
    student: LlamaForCausalLM, teacher: LlamaForCausalLM, batches: torch.Tensor
) -> None:
    report = distill_(
        student, teacher, batches, distill_config(steps=8, autocast_bf16=True), checkpoint_dir=None
    )
    assert all(math.isfinite(x) for x in report.losses)
    assert report.losses[-1] < report.losses[0]
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_a_version_1_config_still_loads() -> None:
    old = {**distill_config().to_dict(), "version": 1}
    assert DistillConfig.from_dict(old) == distill_config()


def test_config_round_trip_and_unknown_key() -> None:
    config = distill_config(max_minutes=2.5, decay="linear", max_grad_norm=None)
    as_json = json.loads(json.dumps(config.to_dict()))
    assert DistillConfig.from_dict(as_json) == config
    with pytest.raises(ValueError, match=r"unknown DistillConfig key.*'lerning_rate'"):
        DistillConfig.from_dict({**as_json, "lerning_rate": 1.0})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("steps", True),
        ("batch_size", 2.0),
        ("seq_len", 1),
        ("grad_accum", 0),
        ("lr", 0.0),
        ("lr", math.nan),
        ("weight_decay", -0.1),
        ("warmup_steps", 31),
        ("temperature", 0),
        ("alpha", 1.5),
        ("max_minutes", -1.0),
        ("max_minutes", 0.0),  # no limit is None
        ("max_grad_norm", 0.0),  # no clipping is None
        ("checkpoint_every", 0),
        ("seed", -1),
        ("log_every", 0),
        ("decay", "step"),
        ("autocast_bf16", 1),
        ("version", 1),  # read by from_dict, which upgrades it
        ("version", 3),
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        distill_config(**{field: value})


def test_lr_schedule_warms_up_then_decays() -> None:
    config = distill_config(steps=10, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    lrs = [config.lr * lr_factor(config, step, 0.0) for step in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert lrs[-1] > 0.1 and config.lr * lr_factor(config, 10, 0.0) == pytest.approx(0.1)


def test_sample_indices_cover_each_epoch_and_are_seeded() -> None:
    stream = sample_indices(10, seed=5, start=0, count=30)
    for epoch in range(3):
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10].tolist()) == list(range(10))
    torch.testing.assert_close(sample_indices(10, seed=5, start=7, count=9), stream[7:16])
    assert not torch.equal(sample_indices(10, seed=6, start=0, count=10), stream[:10])


def test_wrong_batch_shape_is_refused(student: LlamaForCausalLM, teacher: LlamaForCausalLM) -> None:
    with pytest.raises(CompressionError, match="seq_len=32"):
        distill_(
            student,
            teacher,
            token_batches(seed=0, n=8, seq_len=16),
            distill_config(),
            checkpoint_dir=None,
        )


@pytest.mark.slow
def test_ddp_two_ranks_on_gloo_match_one_process(
    teacher: LlamaForCausalLM, batches: torch.Tensor, tmp_path: Path
) -> None:
    steps = 6
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(REPO / "tests" / "compression" / "ddp_distill_main.py"),
        "--out",
        str(tmp_path),
        "--steps",
        str(steps),
    ]
    done = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    losses = ranks[0]["losses"]
    assert len(losses) == steps and losses[-1] < losses[0]
    assert ranks[1]["losses"] == losses  # reduced over ranks, so every rank reports the same

    # batch_size is global: two ranks of 2 sequences make the update one process makes with 4.
    single = tiny_llama(seed=0)
    report = distill_(single, teacher, batches, distill_config(steps=steps), checkpoint_dir=None)
    assert report.losses == pytest.approx(losses, rel=1e-4)
    ddp_weights = load_file(str(tmp_path / "student.safetensors"))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-3, atol=1e-5, msg=name)
