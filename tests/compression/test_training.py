"""The training loop's shared settings: one schedule, one budget rule, one set of groups."""

from __future__ import annotations

import pytest
import torch

from slimserve.compression.distill import DistillConfig
from slimserve.compression.finetune import FinetuneConfig
from slimserve.compression.progress import ProgressEvent, relabelled
from slimserve.compression.training import TrainingConfig, lr_factor, parameter_groups
from tests.compression.ddp_distill_main import tiny_llama
from tests.helpers import tiny_model


@pytest.mark.parametrize("kind", [DistillConfig, FinetuneConfig])
def test_both_stages_anneal_by_the_step_or_the_clock(kind: type[TrainingConfig]) -> None:
    untimed = kind(steps=100, warmup_steps=0, min_lr_ratio=0.1)
    timed = kind(steps=100, warmup_steps=0, min_lr_ratio=0.1, max_minutes=1.0)

    assert lr_factor(untimed, 0, 1e9) == pytest.approx(1.0)  # no limit: the clock is ignored
    assert lr_factor(timed, 0, 30.0) == pytest.approx(0.55)  # half the minute gone
    assert lr_factor(timed, 0, 60.0) == pytest.approx(0.1)


def _decayed(model: torch.nn.Module) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, kept = parameter_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    return {names[id(p)] for p in decayed["params"]}


def test_weight_decay_skips_norms_biases_and_embeddings() -> None:
    tied = tiny_model(360)  # lm_head is the embedding
    untied = tiny_llama(seed=0)
    for model in (tied, untied):
        decayed = _decayed(model)
        assert "model.layers.0.self_attn.q_proj.weight" in decayed
        assert "model.layers.1.mlp.down_proj.weight" in decayed
        assert not any("norm" in n or "embed" in n or "lm_head" in n for n in decayed)
    total = {n for n, _ in untied.named_parameters()}
    assert len(total - _decayed(untied)) == 2 * 2 + 1 + 2  # 2 norms a layer, final, embeddings


def test_frozen_parameters_join_no_group() -> None:
    model = tiny_model(360)
    model.model.layers[0].requires_grad_(False)
    groups = parameter_groups(model, 0.0)
    frozen = {id(p) for p in model.model.layers[0].parameters()}
    assert not any(id(p) in frozen for g in groups for p in g["params"])


def test_progress_events_carry_their_loss_and_take_a_prefix() -> None:
    seen: list[ProgressEvent] = []
    report = relabelled(seen.append, "[2/4]")
    assert report is not None and relabelled(None, "[1/1]") is None

    report(ProgressEvent(stage="distill", done=3, total=9, metrics={"loss": 1.23456}))
    report(ProgressEvent(stage="prune (calibrate)", done=1, total=2))

    assert [e.label for e in seen] == ["[2/4] distill loss 1.235", "[2/4] prune (calibrate)"]
    assert seen[0].done == 3 and seen[0].total == 9
