"""`bench compare`: every version against its parent, in and out of domain, in one table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slimserve.bench.compare import markdown, measure
from slimserve.compression.evaluate import EvaluateConfig
from slimserve.compression.teacher_data import TeacherTextConfig, teacher_text
from slimserve.registry.artifact import publish_model
from slimserve.registry.store import Registry
from tests.helpers import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = EvaluateConfig(
    seq_len=32, max_chunks=2, speed_tokens=0, agreement_rows=3, agreement_tokens=8
)


@pytest.fixture
def registry(tiny_registry: Path, tmp_path: Path) -> Registry:
    shutil.copytree(tiny_registry, tmp_path / "reg")
    reg = Registry(tmp_path / "reg")
    tok = tiny_tokenizer()
    publish_model(reg, "tiny", tiny_model(len(tok), seed=3), tok, parent="tiny@1")
    return reg


def test_each_version_is_measured_against_its_parent_on_both_texts(registry: Registry) -> None:
    root, child = measure(registry, ["tiny@1", "tiny@2"], CONFIG)

    assert root["parent"] is None and not any("ratio" in k for k in root)
    assert child["parent"] == "tiny@1"
    for key in ("", "ood_"):
        # The parent's perplexity is tiny@1's own, measured in the same run.
        assert child[f"{key}parent_perplexity"] == pytest.approx(root[f"{key}perplexity"])
        assert child[f"{key}perplexity_ratio"] == pytest.approx(
            child[f"{key}perplexity"] / root[f"{key}perplexity"]
        )
    assert "no teacher text of tiny@1" in child["agreement_note"]
    assert "agreement_top1" not in child
    assert child["bytes"] > 0


@pytest.mark.slow
def test_agreement_joins_the_table_once_the_parent_has_teacher_text(registry: Registry) -> None:
    made = teacher_text(registry, registry.get("tiny", "1"), TeacherTextConfig())

    rows = measure(registry, ["tiny@1", "tiny@2"], CONFIG)
    table = markdown(rows).splitlines()

    child = rows[1]
    assert child["agreement_data"] == made.artifact.ref and "agreement_note" not in child
    assert child["agreement_rows"] == 3 and child["agreement_positions"] == 3 * 8
    assert 0.0 <= child["agreement_top1"] <= 1.0 and child["agreement_kl"] > 0
    header = [c.strip() for c in table[0].strip("|").split("|")]
    for column in ("ppl", "OOD ppl", "×parent", "top-1", "KL", "MB", "decode tok/s", "×first"):
        assert column in header, column
    assert len(table) == 2 + len(rows)
    cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert cells[:2] == ["tiny@2", "tiny@1"]
    assert cells[header.index("top-1")] == f"{child['agreement_top1']:.3f}"
    assert cells[5] == f"{child['ood_perplexity_ratio']:.3f}×"
