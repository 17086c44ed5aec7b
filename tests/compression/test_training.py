"""The training loop's shared settings: one schedule, one budget rule, one set of groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimserve.compression.distill import DistillConfig
from slimserve.compression.finetune import FinetuneConfig
from slimserve.compression.progress import ProgressEvent, relabelled
from slimserve.compression.training import (
    TrainingConfig,
    TrainReport,
    lr_factor,
    parameter_groups,
    plan_budget,
    train_,
)
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


class _FakeClock:
    """A clock that only moves when a step runs: each call "takes" ``per_call`` seconds."""

    def __init__(self, per_call: float) -> None:
        self.now = 0.0
        self.per_call = per_call

    def __call__(self) -> float:
        return self.now


class _Recorder:
    """A step_fn on a linear model: loss = c_index * sum(w); records the call indices."""

    def __init__(self, clock: _FakeClock) -> None:
        self.clock = clock
        self.calls: list[int] = []

    def __call__(self, model: torch.nn.Module, index: int) -> torch.Tensor:
        self.calls.append(index)
        self.clock.now += self.clock.per_call
        loss = (1.0 + index) * model.weight.sum()  # type: ignore[operator]
        torch.autograd.backward(loss)
        return loss.detach().reshape(1)


def _linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1, bias=False)


def _budgeted(**overrides: object) -> TrainingConfig:
    fields: dict[str, object] = dict(
        steps=100, lr=1e-2, warmup_steps=10, max_minutes=1.0, probe_steps=3, log_every=1
    )
    return TrainingConfig(**(fields | overrides))  # type: ignore[arg-type]


def _train(
    config: TrainingConfig, clock: _FakeClock, **kwargs: object
) -> tuple[TrainReport, _Recorder, list[ProgressEvent]]:
    events: list[ProgressEvent] = []
    step_fn = _Recorder(clock)
    model = kwargs.pop("model", None) or _linear()
    report = train_(
        model,  # type: ignore[arg-type]
        step_fn,
        config,
        names=("loss",),
        data_digest="d",
        stage="test",
        progress=kwargs.pop("progress", events.append),  # type: ignore[arg-type]
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )
    return report, step_fn, events


def test_a_budget_too_small_for_the_steps_shortens_the_schedule_to_end_inside_it() -> None:
    # 6 s a step, 60 s: a warming step and 3 timed ones (24 s), then 36 s less the margin
    # buy 5 more steps. The schedule spans those 9 steps, so it anneals without a cut.
    report, step_fn, events = _train(_budgeted(), _FakeClock(per_call=6.0))

    assert report.plan is not None
    assert (report.plan.from_step, report.plan.steps, report.plan.accumulation) == (4, 9, 1)
    assert report.plan.seconds_per_call == pytest.approx(6.0)
    assert report.plan.warmup_steps == 1  # 10 of 100 steps, scaled to 9 steps
    assert report.steps_done == 9 and not report.stopped_by_time
    assert report.seconds <= 60.0 and step_fn.calls == list(range(9))
    last_lr = events[-1].metrics["lr"]
    assert last_lr == pytest.approx(1e-2 * lr_factor(_budgeted(), 8, 0.0, report.plan))
    assert last_lr < 1e-2 * 0.14  # within 4% of the floor (0.1 lr) at the last step
    budget = report.budget()
    assert budget is not None and budget["steps"] == 9 and budget["stopped_by_time"] is False


def test_a_budget_with_room_to_spare_accumulates_calls_per_step() -> None:
    # 0.5 s a call: after the probe (2 s) about 110 calls fit, 6 steps are left, so each of
    # them takes min(8, 110 // 6) = 8 calls; the step count stays as asked.
    report, step_fn, events = _train(_budgeted(steps=10, warmup_steps=0), _FakeClock(per_call=0.5))

    assert report.plan is not None and report.plan.accumulation == 8
    assert report.steps_done == 10 and report.calls_done == 4 + 6 * 8
    assert step_fn.calls == list(range(4 + 6 * 8))  # every call draws its own data
    # The step's gradient is the mean of its calls': loss_i = (1 + i) sum(w), so the grad
    # of step 4 (calls 4..11) is mean(5..12) = 8.5 for each of the 4 weights.
    assert events[4].metrics["grad_norm"] == pytest.approx(8.5 * 2.0)


def test_without_max_minutes_or_with_fit_budget_off_nothing_is_planned() -> None:
    untimed = _budgeted(max_minutes=None, steps=6, warmup_steps=0)
    plain, calls, _ = _train(untimed, _FakeClock(per_call=6.0))
    assert plain.plan is None and plain.budget() is None and calls.calls == list(range(6))
    off, _, _ = _train(_budgeted(fit_budget=False), _FakeClock(per_call=6.0))
    assert off.plan is None and off.stopped_by_time and off.steps_done == 10  # cut by the clock


def test_steps_that_slow_down_after_the_plan_stop_at_the_first_step_that_shows_it() -> None:
    clock = _FakeClock(per_call=1.0)

    def slow_down(event: ProgressEvent) -> None:
        if event.done == 4:
            clock.per_call = 20.0  # the plan assumed 1 s a call

    report, _, _ = _train(_budgeted(steps=10, warmup_steps=0), clock, progress=slow_down)

    # The first planned step (8 calls at 20 s) overruns; no second one starts.
    assert report.plan is not None and report.plan.accumulation == 8
    assert report.stopped_by_time and report.steps_done == 5
    assert report.budget() == report.plan.to_dict() | {"stopped_by_time": True}


class _StopError(Exception):
    pass


def test_a_resumed_run_keeps_its_plan_and_ends_with_the_same_weights(tmp_path: Path) -> None:
    config = _budgeted(steps=10, warmup_steps=2, checkpoint_every=2)
    straight = _linear()
    whole, _, _ = _train(config, _FakeClock(per_call=0.5), model=straight)

    def stop_at_7(event: ProgressEvent) -> None:
        if event.done == 7:
            raise _StopError

    with pytest.raises(_StopError):
        _train(config, _FakeClock(per_call=0.5), checkpoint_dir=tmp_path, progress=stop_at_7)
    resumed = _linear()
    # A much faster clock would plan otherwise: the saved plan wins.
    rest, _, _ = _train(config, _FakeClock(per_call=0.01), model=resumed, checkpoint_dir=tmp_path)

    assert rest.resumed_from_step == 6 and rest.plan == whole.plan
    assert rest.steps_done == 10
    torch.testing.assert_close(resumed.weight, straight.weight, rtol=0, atol=0)


def test_plan_budget_with_no_time_left_plans_no_more_steps() -> None:
    plan = plan_budget(_budgeted(), step=4, elapsed_s=61.0, seconds_per_call=1.0)
    assert plan.steps == 4 and plan.accumulation == 1
    assert list(plan.calls(3)) == [3]
    with pytest.raises(ValueError, match="max_minutes"):
        plan_budget(_budgeted(max_minutes=None), step=0, elapsed_s=0.0, seconds_per_call=1.0)


@pytest.mark.parametrize(
    ("field", "value"), [("probe_steps", 0), ("max_accumulation", 0), ("fit_budget", 1)]
)
def test_budget_settings_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        _budgeted(**{field: value})
