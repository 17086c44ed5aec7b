"""Evaluation in and out of domain, and agreement with the parent, on tiny models."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from slimserve.compression.data import TextSource, pydoc_topics
from slimserve.compression.errors import RecipeError
from slimserve.compression.evaluate import (
    EvaluateConfig,
    Generations,
    agreement,
    backend_logits,
    check_unseen,
    evaluate,
    model_logits,
    ood_source,
    teacher_rows,
)
from slimserve.compression.recipe import CompressJob, compress, parse_recipe
from slimserve.engine.backends.select import Plan, build_backend
from slimserve.engine.config import ModelConfig
from slimserve.registry.store import Registry
from tests.helpers import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = EvaluateConfig(seq_len=32, max_chunks=2, speed_tokens=0)


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


def _rows(vocab: int, seed: int = 1) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (12, 20, 9)]
    return rows, [4, 11, 1]


def test_a_model_agrees_with_itself_completely(tok: Any) -> None:
    model = tiny_model(len(tok))
    rows, starts = _rows(len(tok))

    same = agreement(model_logits(model), model_logits(model), rows, starts)

    assert same.top1 == 1.0 and same.kl == pytest.approx(0.0, abs=1e-6)
    assert same.positions == (12 - 4) + (20 - 11) + (9 - 1) and same.rows == 3


def test_agreement_is_top1_and_kl_over_the_generated_positions_only(tok: Any) -> None:
    parent, version = tiny_model(len(tok), seed=0), tiny_model(len(tok), seed=7)
    rows, starts = _rows(len(tok))

    got = agreement(model_logits(parent), model_logits(version), rows, starts)

    # By hand, from the full sequences' logits: position t predicts token t + 1.
    same, kl, n = 0, 0.0, 0
    with torch.inference_mode():
        for row, start in zip(rows, starts, strict=True):
            ids = torch.tensor([row])
            p = F.log_softmax(parent(ids).logits[0], -1)[start - 1 : len(row) - 1]
            q = F.log_softmax(version(ids).logits[0], -1)[start - 1 : len(row) - 1]
            same += int((p.argmax(-1) == q.argmax(-1)).sum())
            kl += float((p.exp() * (p - q)).sum())
            n += len(row) - start
    assert got.positions == n
    assert got.top1 == pytest.approx(same / n) and got.top1 < 1.0
    assert got.kl == pytest.approx(kl / n, rel=1e-4) and got.kl > 0


@pytest.mark.parametrize(
    ("rows", "starts", "message"),
    [([], [], "rows"), ([[1, 2, 3]], [0], "outside"), ([[1, 2, 3]], [3], "outside"),
     ([[1, 2, 3]], [1, 2], "one start per row")],
)  # fmt: skip
def test_agreement_refuses_bad_rows(
    tok: Any, rows: list[list[int]], starts: list[int], message: str
) -> None:
    model = model_logits(tiny_model(len(tok)))
    with pytest.raises(ValueError, match=message):
        agreement(model, model, rows, starts)


@pytest.mark.parametrize("plan", [Plan(backend="llama"), Plan(backend="hf")], ids=lambda p: p.key)
def test_the_serving_forward_gives_the_models_own_logits(tok: Any, plan: Plan) -> None:
    model = tiny_model(len(tok))
    rows, starts = _rows(len(tok))
    backend = build_backend(model, ModelConfig.of(device="cpu", max_batch=1), 32, plan=plan)
    served, own = backend_logits(backend), model_logits(model)

    for row, start in zip(rows, starts, strict=True):
        torch.testing.assert_close(served(row, start), own(row, start), rtol=1e-4, atol=1e-4)
    found = agreement(own, served, rows, starts)
    assert found.top1 == 1.0 and found.kl < 1e-6


def test_the_out_of_domain_text_is_cpythons_license_and_no_training_text_holds_it() -> None:
    ood = ood_source()
    assert ood.name.startswith("cpython:LICENSE.txt@") and "PYTHON SOFTWARE FOUNDATION" in ood.text
    for split in ("train", "eval"):
        check_unseen(ood, pydoc_topics(split))  # the built-in texts are clean
    paragraph = max(ood.text.split("\n\n"), key=len)
    tainted = TextSource(name="file:mix.txt", text=f"some prose\n{paragraph}\nmore", digest="x")
    with pytest.raises(ValueError, match="out-of-domain"):
        check_unseen(ood, tainted)


def test_evaluate_measures_both_texts_against_the_parent(tok: Any) -> None:
    parent, version = tiny_model(len(tok), seed=0), tiny_model(len(tok), seed=3)
    rows, starts = _rows(len(tok))
    gens = Generations(rows=rows, starts=starts, source="teacher@1", digest="d" * 64)

    m = evaluate(version, tok, FAST, parent=parent, generations=gens)

    for key in ("", "ood_"):
        assert m[f"{key}perplexity_ratio"] == pytest.approx(
            m[f"{key}perplexity"] / m[f"{key}parent_perplexity"]
        )
        assert m[f"{key}eval_tokens"] == 2 * 31
    assert m["eval_text"].startswith("pydoc_data.topics:eval@")
    assert m["ood_eval_text"] == ood_source().name
    assert m["ood_eval_text_sha256"] == ood_source().digest
    assert m["agreement_forward"] == "torch" and m["agreement_data"] == "teacher@1"
    assert 0.0 <= m["agreement_top1"] < 1.0 and m["agreement_kl"] > 0
    assert m["agreement_positions"] == sum(len(r) - s for r, s in zip(rows, starts, strict=True))
    alone = evaluate(version, tok, FAST)
    assert not any("parent" in k or "ratio" in k or "agreement" in k for k in alone)
    assert alone["perplexity"] == pytest.approx(m["perplexity"])


def test_evaluate_through_the_serving_backend_records_served_figures(tok: Any) -> None:
    model = tiny_model(len(tok))
    rows, starts = _rows(len(tok))
    gens = Generations(rows=rows, starts=starts, source="t", digest="d")
    config = EvaluateConfig(seq_len=32, max_chunks=2, speed_tokens=8, speed_repeats=1)

    m = evaluate(model, tok, config, parent=model, generations=gens)

    assert m["agreement_forward"] == m["backend"]
    for key in ("", "ood_"):
        # The parent is the model itself: only the backend's numerics can differ.
        assert m[f"{key}perplexity_ratio"] == pytest.approx(1.0)
        assert m[f"{key}served_perplexity_ratio"] == pytest.approx(1.0, rel=0.02)
    assert m["agreement_top1"] > 0.9 and m["agreement_kl"] < 0.01
    assert m["decode_tokens_per_s"] > 0 and math.isfinite(m["ttft_ms"])


def test_teacher_rows_put_each_generation_after_its_prompt() -> None:
    from slimserve.compression.teacher_data import TeacherRow

    heldout = (
        TeacherRow(index=0, prompt="a", prompt_ids=(5, 6), generated_ids=(7, 8, 9), seed=1),
        TeacherRow(index=3, prompt="b", prompt_ids=(5,), generated_ids=(), seed=2),
        TeacherRow(index=4, prompt="c", prompt_ids=(4, 4, 4), generated_ids=(1,), seed=3),
    )

    rows, starts = teacher_rows(heldout, limit=5, tokens=64)
    assert rows == [[5, 6, 7, 8, 9], [4, 4, 4, 1]] and starts == [2, 3]  # the empty one dropped
    assert teacher_rows(heldout, limit=1, tokens=2) == ([[5, 6, 7, 8]], [2])  # first 2 tokens


def test_a_run_whose_training_text_holds_the_out_of_domain_text_is_refused_before_work(
    tiny_registry: Path, tmp_path: Path
) -> None:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root)
    registry = Registry(root)
    data = tmp_path / "train.txt"
    data.write_text("Notes.\n\n" + ood_source().text)
    recipe = parse_recipe({"name": "q", "stage": [{"type": "quantize"}, {"type": "evaluate"}]})
    job = CompressJob(recipe=recipe, parent=registry.get("tiny", "1"), to_name="tiny", data=data)

    with pytest.raises(RecipeError, match="out-of-domain"):
        compress(registry, job)
    assert registry.versions("tiny") == [1]
