"""Teacher-generated distillation text: shipped prompts, one stored dataset, reuse, mixing."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from slimserve.compression import teacher_data
from slimserve.compression.recipe import CompressJob, compress, parse_recipe
from slimserve.compression.teacher_data import (
    TeacherTextConfig,
    encode_prompt,
    find_teacher_text,
    generate_rows,
    load_teacher_text,
    packed_chunks,
    prompts_digest,
    select_prompts,
    shipped_prompts,
    split_of,
    teacher_text,
)
from slimserve.registry.artifact import load_model
from slimserve.registry.errors import IntegrityError
from slimserve.registry.store import Registry, sha256_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = TeacherTextConfig(prompts=24, max_new_tokens=12, max_batch=6)
FAST_EVAL = {"type": "evaluate", "seq_len": 32, "max_chunks": 2, "speed_tokens": 0,
             "agreement_rows": 0}  # fmt: skip


@pytest.fixture()
def registry(tiny_registry: Path, tmp_path: Path) -> Registry:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root)
    return Registry(root)


@pytest.fixture()
def generations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many prompts the teacher answered (the real generator runs; this counts calls)."""
    calls: list[int] = []
    real = teacher_data.generate_rows

    def counted(model: Any, tokenizer: Any, prompts: Any, *args: Any, **kw: Any) -> Any:
        indices = kw.get("indices")
        calls.append(len(prompts) if indices is None else len(indices))
        return real(model, tokenizer, prompts, *args, **kw)

    monkeypatch.setattr(teacher_data, "generate_rows", counted)
    return calls


def test_the_shipped_prompts_are_many_varied_and_unique() -> None:
    prompts = shipped_prompts()
    assert len(prompts) >= 300
    assert len(set(prompts)) == len(prompts)
    path = Path(teacher_data.__file__).parent / "prompts" / "teacher.jsonl"
    categories = Counter(json.loads(line)["category"] for line in path.read_text().splitlines())
    assert len(categories) >= 10 and min(categories.values()) >= 10
    # Interleaved: the first 24 prompts (what a short run takes) span a dozen categories.
    first = [json.loads(line)["category"] for line in path.read_text().splitlines()[:24]]
    assert len(set(first)) >= 12


def test_the_split_is_by_prompt_text_and_about_the_asked_share() -> None:
    prompts = shipped_prompts()
    held = [p for p in prompts if split_of(p, 0.1) == "heldout"]
    assert 0.05 < len(held) / len(prompts) < 0.16
    assert [split_of(p, 0.1) for p in prompts[:50]] == [split_of(p, 0.1) for p in prompts[:50]]
    assert all(split_of(p, 0.0) == "train" for p in prompts)


def test_generated_once_stored_with_its_digests_and_reused(
    registry: Registry, generations: list[int]
) -> None:
    teacher = registry.get("tiny", "1")
    events: list[Any] = []
    first = teacher_text(registry, teacher, SMALL, progress=events.append)
    assert generations == [24]
    assert events[-1].stage == "teacher text" and events[-1].done == events[-1].total == 24
    assert len(first.train) + len(first.heldout) == 24 and first.heldout

    again = teacher_text(registry, teacher, SMALL)  # a repeat or a resumed run
    assert generations == [24]  # no second generation
    assert again.digest == first.digest
    assert again.artifact.manifest.created_at == first.artifact.manifest.created_at
    assert registry.datasets.versions("tiny") == [1]
    assert registry.names() == ["tiny"]  # datasets are not models
    assert again.train == first.train and again.heldout == first.heldout

    d = first.artifact.manifest.dataset
    assert first.artifact.manifest.kind == "dataset"
    assert d["teacher"] == {"ref": "tiny@1", "digest": teacher.digest}
    assert d["prompts"]["sha256"] == prompts_digest(select_prompts(SMALL))
    assert d["prompts"]["count"] == 24 and d["prompts"]["heldout"] == len(first.heldout)
    assert d["sha256"] == sha256_file(first.artifact.path / "rows.safetensors")
    rows = first.train + first.heldout
    assert d["tokens"]["generated"] == sum(len(r.generated_ids) for r in rows)
    assert d["sampling"]["temperature"] == SMALL.temperature
    assert d["sampling"]["max_new_tokens"] == 12
    assert d["chat_template"] is True

    # Other generation parameters are another dataset.
    other = teacher_text(registry, teacher, TeacherTextConfig(prompts=24, max_new_tokens=8))
    assert generations == [24, 24]
    assert other.artifact.version == 2
    assert find_teacher_text(registry, teacher, SMALL) == first.artifact


def test_the_held_out_rows_alone_are_those_of_the_full_set(
    registry: Registry, generations: list[int]
) -> None:
    teacher = registry.get("tiny", "1")
    held = replace(SMALL, split="heldout")
    want = [i for i, p in enumerate(select_prompts(SMALL)) if split_of(p, 0.1) == "heldout"]
    assert 0 < len(want) < 24
    part = teacher_text(registry, teacher, held)
    assert generations == [len(want)] and not part.train
    assert [r.index for r in part.heldout] == want
    assert part.artifact.manifest.dataset["prompts"]["rows"] == "heldout"
    assert teacher_text(registry, teacher, held).digest == part.digest  # reused
    assert generations == [len(want)]

    full = teacher_text(registry, teacher, SMALL)  # a distill run's: its own dataset
    assert generations == [len(want), 24] and full.artifact.version == 2
    assert full.heldout == part.heldout  # same seeds per prompt: the same rows
    # With a full dataset stored, the held-out rows come from it.
    assert find_teacher_text(registry, teacher, held) == full.artifact
    with pytest.raises(ValueError, match="held out"):
        teacher_text(registry, teacher, replace(SMALL, prompts=1, split="heldout"))


def test_prompts_go_through_the_chat_template_and_answers_are_reproducible(
    tiny_registry: Path,
) -> None:
    model, tok = load_model(Registry(tiny_registry).get("tiny", "1"))
    prompts = select_prompts(SMALL)[:6]
    alone = generate_rows(model, tok, prompts, TeacherTextConfig(max_new_tokens=10, max_batch=1))
    batched = generate_rows(model, tok, prompts, TeacherTextConfig(max_new_tokens=10))
    assert alone == batched  # a fixed seed per prompt, whatever the batch
    row = alone[0]
    templated = tok.apply_chat_template(
        [{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=False
    )
    assert templated.startswith("<|im_start|>user\n")
    assert list(row.prompt_ids) == tok.encode(templated, add_special_tokens=False)
    assert list(row.prompt_ids) == encode_prompt(tok, prompts[0])
    assert 1 <= len(row.generated_ids) <= 10
    shifted = generate_rows(
        model, tok, prompts, TeacherTextConfig(max_new_tokens=10, seed=1, max_batch=1)
    )
    assert shifted != alone


def test_a_tampered_dataset_is_refused(registry: Registry) -> None:
    made = teacher_text(registry, registry.get("tiny", "1"), SMALL)
    path = made.artifact.path / "prompts.jsonl"
    os.chmod(path, 0o644)
    path.write_text(path.read_text().replace("basil", "thyme")[:-1] + "x")
    with pytest.raises(IntegrityError, match=r"prompts\.jsonl"):
        load_teacher_text(made.artifact)


def test_packed_chunks_join_rows_end_to_end(registry: Registry) -> None:
    made = teacher_text(registry, registry.get("tiny", "1"), SMALL)
    chunks = packed_chunks(made.train, seq_len=32, max_chunks=1000)
    stream = [i for r in made.train for i in (*r.prompt_ids, *r.generated_ids)]
    assert chunks.shape == (len(stream) // 32, 32)
    assert chunks.flatten().tolist() == stream[: chunks.numel()]
    with pytest.raises(ValueError, match="fewer than one chunk"):
        packed_chunks(made.train[:1], seq_len=100_000, max_chunks=1)


def _teacher_recipe(**distill: Any) -> Any:
    stage = {"type": "distill", "data": "teacher", "teacher_prompts": 24,
             "teacher_new_tokens": 12, "steps": 2, "batch_size": 2, "seq_len": 32,
             "warmup_steps": 0, "log_every": 1, **distill}  # fmt: skip
    prune = {"type": "prune", "mlp_ratio": 0.5, "calibration_samples": 4, "seq_len": 32}
    return parse_recipe({"name": "t", "stage": [prune, stage, FAST_EVAL]})


def test_a_recipe_distills_on_teacher_text_mixed_with_data(
    registry: Registry, tmp_path: Path, generations: list[int]
) -> None:
    own = tmp_path / "own.txt"
    own.write_text("the user's own text about ledgers and invoices. " * 200)
    parent = registry.get("tiny", "1")
    job = CompressJob(
        recipe=_teacher_recipe(text_share=0.5), parent=parent, to_name="tiny", data=own
    )
    art = compress(registry, job)
    assert generations == [24]
    report = art.manifest.recipe["reports"]["stage2_distill"]["data"]
    made = find_teacher_text(registry, parent, TeacherTextConfig(prompts=24, max_new_tokens=12))
    assert made is not None
    assert report["teacher_text"]["digest"] == made.digest
    assert report["teacher_text"]["prompts_sha256"] == made.manifest.dataset["prompts"]["sha256"]
    n_teacher = report["teacher_text"]["sequences"]
    assert n_teacher >= 4
    assert report["text"]["name"] == "file:own.txt"
    assert report["text"]["sequences"] == min(n_teacher, 4)  # half of all, capped at the count
    assert art.manifest["data"]["teacher_text"]["digest"] == made.digest
    assert art.manifest["data"]["train"]["name"] == "file:own.txt"
    assert art.manifest.architecture["intermediate_size"] == 64

    # The same recipe again (another version, same teacher text): nothing is generated.
    before = list(generations)
    datasets = registry.datasets.versions("tiny")
    compress(registry, job)
    assert generations == before
    assert registry.datasets.versions("tiny") == datasets


def test_pruning_can_calibrate_on_the_teacher_text_distillation_reuses(
    registry: Registry, generations: list[int]
) -> None:
    distill = {"type": "distill", "data": "teacher", "teacher_prompts": 24,
               "teacher_new_tokens": 12, "steps": 1, "batch_size": 2, "seq_len": 32,
               "warmup_steps": 0}  # fmt: skip
    prune = {"type": "prune", "mlp_ratio": 0.5, "calibration_samples": 4, "seq_len": 32}
    on_teacher_prune = {**prune, "calibration": "teacher", "teacher_prompts": 24,
                        "teacher_new_tokens": 12}  # fmt: skip
    parent = registry.get("tiny", "1")

    def run(*stages: dict[str, Any]) -> Any:
        recipe = parse_recipe({"name": "t", "stage": [*stages, FAST_EVAL]})
        return compress(registry, CompressJob(recipe=recipe, parent=parent, to_name="tiny"))

    distilled = run(on_teacher_prune, distill)
    assert generations == [24]  # made once, by the prune stage; distill read it back
    assert distilled.manifest.recipe["stages"][0]["config"]["calibration"] == "teacher"
    # Pruned alone: other calibration tokens rank the channels differently.
    on_teacher, on_text = run(on_teacher_prune), run(prune)
    assert generations == [24]
    a, _ = load_model(on_teacher)
    b, _ = load_model(on_text)
    wa = a.model.layers[0].mlp.down_proj.weight
    wb = b.model.layers[0].mlp.down_proj.weight
    assert wa.shape == wb.shape and not torch.equal(wa, wb)


def test_teacher_text_without_data_uses_the_default_text_share(
    registry: Registry, generations: list[int]
) -> None:
    job = CompressJob(recipe=_teacher_recipe(text_share=0.0), parent=registry.get("tiny", "1"),
                      to_name="tiny")  # fmt: skip
    art = compress(registry, job)
    report = art.manifest.recipe["reports"]["stage2_distill"]["data"]
    assert report["text"]["sequences"] == 0
    assert report["teacher_text"]["sequences"] >= 4
    assert generations == [24]


def test_asking_for_more_prompts_than_shipped_is_refused_before_any_work(
    registry: Registry, generations: list[int]
) -> None:
    from slimserve.compression.errors import RecipeError

    job = CompressJob(recipe=_teacher_recipe(teacher_prompts=10_000),
                      parent=registry.get("tiny", "1"), to_name="tiny")  # fmt: skip
    with pytest.raises(RecipeError, match="prompts=10000 is more than the"):
        compress(registry, job)
    assert generations == []
    assert registry.versions("tiny") == [1]


def test_distill_data_is_validated() -> None:
    from slimserve.compression.distill import DistillConfig

    with pytest.raises(ValueError, match="data='web' is not known"):
        DistillConfig(data="web")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"text_share=1\.0 is invalid"):
        DistillConfig(text_share=1.0)
