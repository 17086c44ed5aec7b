"""`slimserve bench grammar` on the tiny model: every table, every figure measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimserve.bench.grammar import SCHEMAS, run


def test_grammar_bench_prints_every_table(
    tiny_registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "grammar.json"
    assert run(tiny_registry, "tiny@1", batch=3, repeats=1, threads=1, json_out=out_json) == 0
    out = capsys.readouterr().out
    assert "cpu: " in out and "load average" in out
    for head in ("| schema | compile cold ms |", "| per token (batch 1), µs |",
                 "| batch of 3, per step, µs |", "| masks for a 4-token draft, µs |"):  # fmt: skip
        assert head in out
    result = json.loads(out_json.read_text())
    assert set(result["compile_ms"]) == set(SCHEMAS)
    assert all(v["cold"] > 0 and v["cached"] > 0 for v in result["compile_ms"].values())
    # Every example output was walked token by token (the bench refuses one its grammar refuses).
    assert result["tokens_walked"] > 3 * len(SCHEMAS)
    assert all(v["mean"] > 0 for v in result["per_token_us"].values())
    assert all(
        result["batch"][k]["mean"] > 0 for k in ("fill one by one", "fill parallel", "apply")
    )
