"""Recipes end to end on a tiny model in a real registry."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from slimserve.compression.errors import RecipeError
from slimserve.compression.progress import ProgressEvent
from slimserve.compression.recipe import (
    CompressJob,
    apply_overrides,
    compress,
    load_recipe,
    parse_recipe,
)
from slimserve.compression.teacher_data import TeacherTextConfig, find_teacher_text
from slimserve.registry.artifact import load_model
from slimserve.registry.errors import IntegrityError
from slimserve.registry.store import Registry

ROOT = Path(__file__).resolve().parents[2]
# agreement_rows = 0: the agreement with the parent needs the full teacher text (minutes on
# a shared core); tests/compression/test_evaluate.py measures it.
FAST_EVAL = {"type": "evaluate", "seq_len": 32, "max_chunks": 2, "speed_tokens": 8,
             "speed_repeats": 1, "agreement_rows": 0}  # fmt: skip


@pytest.fixture()
def registry(tiny_registry: Path, tmp_path: Path) -> Registry:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root)
    return Registry(root)


def recipe(*stages: dict[str, Any], name: str = "t") -> Any:
    return parse_recipe({"name": name, "stage": [*stages, FAST_EVAL]})


def test_shipped_recipes_parse() -> None:
    names = {p.stem for p in (ROOT / "recipes").glob("*.toml")}
    assert {"int8", "int4", "bf16", "prune20-distill", "prune50-distill-int8", "draft"} <= names
    for path in (ROOT / "recipes").glob("*.toml"):
        r = load_recipe(path)
        assert "evaluate" in [s.type for s in r.stages]  # every version is measured
        assert r.stages[-1].type in ("evaluate", "speculate")
        assert all(s.config.version == type(s.config).current_version() for s in r.stages)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "stage": [{"type": "shrink"}]}, "unknown type 'shrink'"),
        ({"name": "x", "stage": [{"type": "prune", "mlp_ratio": 0.2, "colour": 1}]}, "colour"),
        ({"name": "x", "stage": [{"type": "prune", "mlp_ratio": 1.5}]}, "mlp_ratio"),
        ({"name": "x", "stage": [{"type": "distill", "stepz": 3}]}, "stepz"),
        ({"name": "x", "stage": [{"type": "quantize", "scheme": "int3"}]}, "scheme"),
        ({"name": "x", "stage": [{"type": "quantize"}, {"type": "prune", "mlp_ratio": 0.1}]},
         "order"),
        ({"name": "x", "stage": []}, "at least one"),
        ({"stage": [{"type": "evaluate"}]}, "'name'"),
        ({"name": "x", "stages": []}, "unknown top-level keys"),
    ],
)  # fmt: skip
def test_bad_recipes_are_refused_naming_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_int8_recipe_publishes_a_version_with_lineage_and_metrics(registry: Registry) -> None:
    parent = registry.get("tiny", "1")
    job = CompressJob(
        recipe=recipe({"type": "quantize", "scheme": "int8-weight-only"}, name="int8"),
        parent=parent,
        to_name="tiny",
    )
    art = compress(registry, job)
    assert art.ref == "tiny@2"
    m = art.manifest
    assert m["parent"] == "tiny@1"
    assert m["recipe"]["name"] == "int8"
    assert m["recipe"]["stages"][0] == {
        "type": "quantize",
        "config": {"version": 1, "scheme": "int8-weight-only", "group_size": 128},
    }
    assert m["quantization"]["scheme"] == "int8-weight-only" and m["quantization"]["kernels"]
    for key in ("perplexity", "eval_tokens", "parameters", "bytes", "decode_tokens_per_s",
                "ttft_ms", "device"):  # fmt: skip
        assert key in m["metrics"], key
    # Reload from the registry (safetensors, checksums verified): logits stay close.
    q, _ = load_model(art)
    f, _ = load_model(parent)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.inference_mode():
        diff = (q(ids).logits - f(ids).logits).abs().max().item()
    assert diff < 0.05, diff  # per-row int8 on a random tiny model


def test_a_compressed_version_keeps_the_input_contract_of_its_parent(registry: Registry) -> None:
    # A fraud scorer records the prompt format it was trained on; its int8 copy reads the same
    # prompts, so it must say so too (the client checks the version it is served).
    parent = registry.get("tiny", "1")
    scorer = replace(parent, manifest={**parent.manifest, "metrics": {"prompt_format": 3}})
    job = CompressJob(
        recipe=recipe({"type": "quantize", "scheme": "int8-weight-only"}, name="int8"),
        parent=scorer,
        to_name="tiny",
    )

    art = compress(registry, job)

    assert art.manifest["metrics"]["prompt_format"] == 3
    assert "perplexity" in art.manifest["metrics"]  # measured afresh, not copied
    plain = compress(registry, replace(job, parent=parent))
    assert "prompt_format" not in plain.manifest["metrics"]


def test_interrupted_run_publishes_nothing_then_resumes(registry: Registry) -> None:
    r = recipe(
        {"type": "prune", "mlp_ratio": 0.25, "importance": "activation",
         "calibration_samples": 2, "seq_len": 16},
        {"type": "distill", "steps": 6, "batch_size": 2, "seq_len": 16,
         "checkpoint_every": 2, "log_every": 1},
    )  # fmt: skip
    job = CompressJob(recipe=r, parent=registry.get("tiny", "1"), to_name="tiny")

    def interrupt(event: ProgressEvent) -> None:
        if "distill" in event.stage and event.done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(registry, job, interrupt)
    assert registry.versions("tiny") == [1]
    assert not list((registry.root / ".staging").iterdir())
    art = compress(registry, job)
    report = next(v for k, v in art.manifest["recipe"]["reports"].items() if "distill" in k)
    assert report["resumed_from_step"] == 4 and report["steps_done"] == 6
    assert art.manifest["architecture"]["intermediate_size"] == 96
    assert not (registry.root / ".work").exists() or not any((registry.root / ".work").iterdir())


def test_int4_is_refused_on_cpu_before_any_work(registry: Registry) -> None:
    job = CompressJob(
        recipe=recipe({"type": "quantize", "scheme": "int4-weight-only"}),
        parent=registry.get("tiny", "1"),
        to_name="tiny",
    )
    with pytest.raises(RecipeError, match="int4-weight-only needs CUDA"):
        compress(registry, job)
    assert registry.versions("tiny") == [1]


def test_a_parent_failing_its_checksum_is_refused(registry: Registry) -> None:
    parent = registry.get("tiny", "1")
    weights = parent.path / "model.safetensors"
    os.chmod(parent.path, 0o755)
    os.chmod(weights, 0o644)
    with weights.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    job = CompressJob(recipe=recipe(), parent=parent, to_name="tiny")
    with pytest.raises(IntegrityError, match="refusing to compress"):
        compress(registry, job)
    assert registry.versions("tiny") == [1]


def test_a_finetune_stage_without_examples_is_refused_before_any_work(registry: Registry) -> None:
    job = CompressJob(
        recipe=recipe({"type": "finetune", "steps": 2, "warmup_steps": 0}),
        parent=registry.get("tiny", "1"),
        to_name="tiny",
    )
    with pytest.raises(RecipeError, match="prepared \\(prompt, label\\) examples"):
        compress(registry, job)
    assert registry.versions("tiny") == [1]


def test_a_quantized_parent_is_refused(registry: Registry) -> None:
    int8 = recipe({"type": "quantize", "scheme": "int8-weight-only"})
    quantized = compress(
        registry, CompressJob(recipe=int8, parent=registry.get("tiny", "1"), to_name="tiny")
    )
    job = CompressJob(recipe=recipe(), parent=quantized, to_name="tiny")
    with pytest.raises(RecipeError, match=r"tiny@2 is quantized \(int8-weight-only\)"):
        compress(registry, job)
    assert registry.versions("tiny") == [1, 2]


def test_overrides_set_fields_by_stage_type_or_position() -> None:
    data = {"name": "x", "stage": [{"type": "prune", "mlp_ratio": 0.2},
                                   {"type": "distill", "steps": 200}]}  # fmt: skip
    out = apply_overrides(
        data,
        ["distill.steps=3", "2.max_minutes=1.5", "distill.data=teacher", "1.importance='taylor'",
         "distill.autocast_bf16=true"],
    )  # fmt: skip
    assert out["stage"][1] == {"type": "distill", "steps": 3, "max_minutes": 1.5,
                               "data": "teacher", "autocast_bf16": True}  # fmt: skip
    assert out["stage"][0]["importance"] == "taylor"
    assert data["stage"][1] == {"type": "distill", "steps": 200}  # the input is left alone
    r = parse_recipe(out)
    assert r.stages[1].config.steps == 3
    assert r.digest != parse_recipe(data).digest  # the manifest records what actually ran
    with pytest.raises(RecipeError, match=r"not STAGE\.KEY=VALUE"):
        apply_overrides(data, ["distill.steps"])
    with pytest.raises(RecipeError, match="no stage 'quantize'"):
        apply_overrides(data, ["quantize.scheme=bfloat16"])
    with pytest.raises(RecipeError, match="stepz"):
        load_recipe(ROOT / "recipes" / "prune20-distill.toml", ["distill.stepz=3"])


def test_shipped_prune_recipes_distill_on_teacher_text() -> None:
    for name in ("prune20-distill", "prune50-distill-int8", "draft"):
        r = load_recipe(ROOT / "recipes" / f"{name}.toml")
        distill = next(s.config for s in r.stages if s.type == "distill")
        assert distill.data == "teacher", name
        prune = next(s.config for s in r.stages if s.type == "prune")
        assert prune.channel_multiple == 32, name


@pytest.mark.slow  # the teacher answers all shipped prompts once (~1 min on a shared core)
def test_the_draft_recipe_makes_a_small_int8_draft(tmp_path: Path) -> None:
    from tests.helpers import publish_tiny

    publish_tiny(tmp_path, "deep", num_hidden_layers=30)  # as deep as SmolLM2-135M
    registry = Registry(tmp_path)
    budgets = [
        "prune.calibration_samples=4", "prune.seq_len=32",
        "distill.steps=2", "distill.batch_size=2", "distill.seq_len=32", "distill.warmup_steps=0",
        "evaluate.seq_len=32", "evaluate.max_chunks=2", "evaluate.speed_tokens=0",
        "evaluate.agreement_rows=0", "speculate.prompts=2", "speculate.new_tokens=8",
    ]  # fmt: skip
    r = load_recipe(ROOT / "recipes" / "draft.toml", budgets)
    assert [s.type for s in r.stages] == ["prune", "distill", "quantize", "evaluate", "speculate"]
    parent = registry.get("deep", "1")
    art = compress(registry, CompressJob(recipe=r, parent=parent, to_name="deep-draft"))
    arch = art.manifest.architecture
    assert arch["num_hidden_layers"] == 8
    assert arch["intermediate_size"] == 64  # half of 128, a multiple of 32
    assert (arch["num_attention_heads"], arch["num_key_value_heads"]) == (2, 2)
    assert art.manifest.quantization_scheme == "int8-weight-only"
    assert art.manifest.parent == "deep@1"
    # The shipped prompts, as the recipe asks: the dataset every later run of it reuses.
    made = find_teacher_text(registry, parent, TeacherTextConfig())
    assert made is not None and made.manifest.dataset["prompts"]["count"] >= 300
    assert art.manifest["data"]["teacher_text"]["digest"] == made.digest
    model, _ = load_model(art)
    with torch.inference_mode():
        logits = model(torch.tensor([[5, 17, 42]])).logits
    assert logits.shape[-1] == parent.manifest.architecture["vocab_size"]
    assert torch.isfinite(logits).all()
