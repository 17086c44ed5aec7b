"""Fine-tuning a causal LM to answer with a label, and the fraud trainer built on it."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from slimserve.compression.finetune import FinetuneConfig, finetune_
from slimserve.compression.labels import label_probabilities
from slimserve.compression.progress import ProgressEvent
from slimserve.compression.training import lr_factor
from slimserve.fraud import write_transactions
from slimserve.fraud.simulate import simulate
from slimserve.fraud.train import (
    TrainConfig,
    evaluation_sample,
    train_fraud_scorer,
    training_pool,
)
from slimserve.registry.artifact import publish_model
from slimserve.registry.store import Registry
from tests.helpers import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Single tokens in the tiny tokenizer (checked in a test below).
YES, NO = " hello", " main"
_WORDS = ["the", "quick", "brown", "lazy", "dog", "over", "numbers", "again", "code", "world"]


def toy_examples(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Separable: a prompt that starts with 'café' is YES, one that starts with 'python' NO."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = " ".join(rng.choices(_WORDS, k=rng.randint(2, 6)))
        out.append((f"café {words}", YES) if i % 2 else (f"python {words}", NO))
    return out


def right_label_probability(model: Any, tok: Any, examples: list[tuple[str, str]]) -> float:
    probs = label_probabilities(model, tok, [p for p, _ in examples], [YES, NO])
    right = [p[0] if label == YES else p[1] for p, (_, label) in zip(probs, examples, strict=True)]
    return sum(right) / len(right)


@pytest.fixture
def tok() -> Any:
    return tiny_tokenizer()


def test_labels_are_single_tokens_of_the_tiny_tokenizer(tok: Any) -> None:
    assert len(tok(YES, add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(NO, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("loss", ["labels", "vocab"])
def test_finetune_learns_a_separable_task(tok: Any, loss: str) -> None:
    model = tiny_model(len(tok), seed=1)
    train, held_out = toy_examples(64, seed=0), toy_examples(20, seed=1)
    before = right_label_probability(model, tok, held_out)
    seen: list[ProgressEvent] = []
    config = FinetuneConfig(
        steps=40, batch_size=8, lr=3e-3, warmup_steps=4, log_every=10, loss=loss, seed=0
    )

    report = finetune_(model, tok, train, config, progress=seen.append)

    after = right_label_probability(model, tok, held_out)
    assert report.steps == 40 and not report.stopped_early
    assert report.final_loss < 0.5 * report.first_loss
    assert before < 0.6
    assert after > 0.9
    assert [p.done for p in seen] == [10, 20, 30, 40]
    assert report.label_counts == {YES: 32, NO: 32}
    assert not model.training


def test_oversampling_balances_a_rare_label(tok: Any) -> None:
    # 4 YES among 64: without balancing the model would learn to always say NO.
    examples = [e for e in toy_examples(120) if e[1] == NO][:60] + [
        e for e in toy_examples(120) if e[1] == YES
    ][:4]
    model = tiny_model(len(tok), seed=2)
    config = FinetuneConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=4, balance="oversample")

    finetune_(model, tok, examples, config)

    rare = [e for e in toy_examples(40, seed=5) if e[1] == YES]
    assert right_label_probability(model, tok, rare) > 0.8


def test_train_layers_freezes_earlier_blocks_and_embeddings(tok: Any) -> None:
    model = tiny_model(len(tok), seed=3)
    first = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    last = model.model.layers[-1].mlp.up_proj.weight.detach().clone()
    embed = model.model.embed_tokens.weight.detach().clone()
    config = FinetuneConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, train_layers=1)

    finetune_(model, tok, toy_examples(16), config)

    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, first)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert not torch.equal(model.model.layers[-1].mlp.up_proj.weight, last)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_batched_label_probabilities_match_one_unpadded_prompt_at_a_time(tok: Any) -> None:
    model = tiny_model(len(tok), seed=4)
    prompts = ["café naïve", "the quick brown fox jumps over the lazy dog", "hello"]
    labels = [YES, " numbers"]  # a multi-token label takes the general path

    batched = label_probabilities(model, tok, prompts, labels, batch_size=3)

    for prompt, got in zip(prompts, batched, strict=True):
        ids = tok(prompt)["input_ids"]
        logps = []
        for label in labels:
            cont = tok(label, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + cont])).logits[0]
            logp = torch.log_softmax(logits, dim=-1)
            logps.append(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(cont)))
        norm = math.log(sum(math.exp(v) for v in logps))
        assert got == pytest.approx([math.exp(v - norm) for v in logps], abs=1e-4)


def test_max_minutes_stops_early(tok: Any) -> None:
    model = tiny_model(len(tok))
    config = FinetuneConfig(steps=1000, batch_size=2, max_minutes=1e-4)

    report = finetune_(model, tok, toy_examples(8), config)

    assert report.stopped_early and report.steps < 1000


def test_labels_loss_refuses_multi_token_labels(tok: Any) -> None:
    model = tiny_model(len(tok))
    with pytest.raises(ValueError, match="single-token"):
        finetune_(model, tok, [("café", " numbers")], FinetuneConfig(loss="labels"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", -1),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("weight_decay", -0.1),
        ("warmup_steps", -1),
        ("balance", "smote"),
        ("loss", "focal"),
        ("max_minutes", -1.0),
        ("max_minutes", 0.0),  # no limit is None
        ("max_grad_norm", 0.0),  # no clipping is None
        ("warmup_steps", 301),
        ("max_seq_len", 1),
        ("train_layers", -2),
        ("log_every", 0),
        ("version", 1),  # read by from_dict, which upgrades it
        ("version", 3),
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        FinetuneConfig(**{field: value})  # type: ignore[arg-type]


def test_config_round_trips_and_refuses_unknown_keys() -> None:
    config = FinetuneConfig(steps=7, warmup_steps=2, lr=1e-4, balance="weight", train_layers=2)

    assert FinetuneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown FinetuneConfig keys \\['epochs'\\]"):
        FinetuneConfig.from_dict({**config.to_dict(), "epochs": 3})


def test_train_layers_beyond_the_model_is_refused(tok: Any) -> None:
    with pytest.raises(ValueError, match="train_layers 5 exceeds the model's 2 blocks"):
        finetune_(tiny_model(len(tok)), tok, toy_examples(4), FinetuneConfig(train_layers=5))


# ---- the fraud trainer ---------------------------------------------------------------------
def test_training_pool_keeps_every_fraud_and_samples_legit_before_the_cut() -> None:
    labels = [0] * 90 + [1] * 10 + [1] * 5  # the last 5 are past the cut
    pool = training_pool(labels, 100, 2.0, seed=0)

    assert sum(labels[i] for i in pool) == 10
    assert len(pool) == 30 and max(pool) < 100


def test_evaluation_sample_weights_legit_to_the_file_mix() -> None:
    labels = [0] * 1000 + [1] * 20
    sample = evaluation_sample(labels, 0, frauds=10, legit=100, seed=0)

    assert sum(labels[i] for i in sample.indices) == 10
    # 100 legit stand for 1000, 10 frauds for 20: each legit counts (1000/100) * (10/20).
    assert sample.legit_weight == pytest.approx(5.0)


def test_train_fraud_scorer_publishes_a_version_with_its_recipe(tmp_path: Path, tok: Any) -> None:
    registry = Registry(tmp_path / "registry")
    model = tiny_model(len(tok), max_position_embeddings=512)
    publish_model(registry, "tiny", model, tok, source={"kind": "test"})
    train_file, test_file = tmp_path / "train.csv", tmp_path / "test.jsonl"
    write_transactions(train_file, simulate(25, 6, seed=1))
    write_transactions(test_file, simulate(15, 6, seed=2))
    config = TrainConfig(
        data=train_file,
        registry=registry.root,
        finetune=FinetuneConfig(steps=2, batch_size=4, warmup_steps=0, max_seq_len=400),
        base="tiny",
        name="fraud-scorer",
        alias="production",
        eval_data=test_file,
        eval_frauds=6,
        eval_legit=10,
    )

    seen: list[ProgressEvent] = []
    result = train_fraud_scorer(config, progress=seen.append)

    trained = [e for e in seen if "loss" in e.metrics]
    assert [(e.stage, e.done, e.total) for e in trained] == [("[1/1] finetune", 2, 2)]
    assert result.finetune.steps == 2
    artifact = registry.get("fraud-scorer", "production")
    manifest = artifact.manifest
    assert result.ref == artifact.ref == "fraud-scorer@1"
    assert manifest["parent"] == "tiny@1"
    assert manifest["recipe"]["name"] == "fraud-finetune"
    stage = manifest["recipe"]["stages"][0]
    assert stage["type"] == "finetune"
    assert FinetuneConfig.from_dict(stage["config"]) == config.finetune
    assert manifest["recipe"]["reports"]["stage1_finetune"]["steps"] == 2
    assert manifest["recipe"]["parent_digest"] == registry.get("tiny", "1").digest
    assert manifest["data"]["file"] == "train.csv"
    assert len(manifest["data"]["sha256"]) == 64
    assert manifest["data"]["eval_file"] == "test.jsonl"
    for key in ("roc_auc", "pr_auc", "baseline_roc_auc", "baseline_pr_auc"):
        assert 0.0 <= manifest["metrics"][key] <= 1.0
    assert manifest["metrics"]["eval_frauds"] == 6


def test_train_fraud_scorer_refuses_a_quantized_base(tmp_path: Path, tok: Any) -> None:
    registry = Registry(tmp_path / "registry")
    model = tiny_model(len(tok))
    publish_model(registry, "tiny", model, tok, quantization={"scheme": "int8-weight-only"})
    data = tmp_path / "train.csv"
    write_transactions(data, simulate(10, 4, seed=1))
    config = TrainConfig(
        data=data,
        registry=registry.root,
        finetune=FinetuneConfig(steps=1, warmup_steps=0),
        base="tiny",
    )

    with pytest.raises(ValueError, match="tiny@1 is quantized \\(int8-weight-only\\)"):
        train_fraud_scorer(config)


def test_the_learning_rate_anneals_by_the_step_or_the_clock_whichever_ends_first() -> None:
    steps = FinetuneConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(steps, 0, 0.0) == pytest.approx(0.1)  # warm-up: 1/10
    assert lr_factor(steps, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(steps, 55, 1e9) == pytest.approx(0.55)  # no time limit: half-way
    assert lr_factor(steps, 100, 0.0) == pytest.approx(0.1)

    timed = FinetuneConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1, max_minutes=2.0)
    assert lr_factor(timed, 20, 60.0) == pytest.approx(0.55)  # half the time gone
    assert lr_factor(timed, 20, 120.0) == pytest.approx(0.1)  # out of time: the floor
    assert lr_factor(timed, 55, 1.0) == pytest.approx(0.55)  # the steps run out first


def test_a_version_1_config_loads_with_none_for_off_and_no_limit() -> None:
    old = {"version": 1, "steps": 7, "warmup_steps": 2, "grad_clip": 0.0, "max_minutes": 0.0}
    upgraded = FinetuneConfig.from_dict(old)
    assert upgraded.version == 2
    assert upgraded.max_grad_norm is None and upgraded.max_minutes is None

    clipped = FinetuneConfig.from_dict({**old, "grad_clip": 0.5, "max_minutes": 3.0})
    assert (clipped.max_grad_norm, clipped.max_minutes) == (0.5, 3.0)
    with pytest.raises(ValueError, match=r"unknown FinetuneConfig keys \['grad_clip'\]"):
        FinetuneConfig.from_dict({**old, "version": 2})  # version 2 has no grad_clip


class _StopError(Exception):
    pass


def test_an_interrupted_finetune_resumes_to_the_same_weights(tok: Any, tmp_path: Path) -> None:
    config = FinetuneConfig(
        steps=6, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, log_every=1
    )
    straight = tiny_model(len(tok), seed=5)
    finetune_(straight, tok, toy_examples(16), config)

    def stop_at_3(event: ProgressEvent) -> None:
        if event.done == 3:
            raise _StopError

    interrupted = tiny_model(len(tok), seed=5)
    with pytest.raises(_StopError):
        finetune_(interrupted, tok, toy_examples(16), config, stop_at_3, checkpoint_dir=tmp_path)
    resumed = tiny_model(len(tok), seed=5)
    report = finetune_(resumed, tok, toy_examples(16), config, checkpoint_dir=tmp_path)

    assert report.resumed_from_step == 2 and report.steps == 6
    expected = straight.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_bf16_autocast_where_native_keeps_fp32_weights_and_records_the_choice(tok: Any) -> None:
    from slimserve.compression.distill import bf16_pays

    model = tiny_model(len(tok))
    config = FinetuneConfig(steps=4, batch_size=2, warmup_steps=1, autocast_bf16=True)

    report = finetune_(model, tok, toy_examples(8), config)

    assert report.autocast_bf16 == bf16_pays(torch.device("cpu"))
    assert math.isfinite(report.final_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert report.to_dict()["autocast_bf16"] == report.autocast_bf16


def test_a_budgeted_finetune_records_its_plan(tok: Any) -> None:
    model = tiny_model(len(tok))
    config = FinetuneConfig(steps=8, batch_size=2, warmup_steps=1, max_minutes=10.0)

    report = finetune_(model, tok, toy_examples(8), config)

    budget = report.to_dict()["budget"]
    assert budget is not None and budget["from_step"] == config.probe_steps + 1
    assert budget["accumulation"] > 1  # ten minutes is far more than 8 tiny steps need
    assert report.examples_seen == config.batch_size * (
        budget["from_step"] + (8 - budget["from_step"]) * budget["accumulation"]
    )
    assert json.dumps(report.to_dict())  # the manifest records it as JSON
