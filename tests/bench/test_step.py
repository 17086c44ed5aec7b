"""`slimserve bench step` on the tiny model: the phase table, with and without a draft."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.bench.step import run_step_profile


def test_step_profile_prints_every_phase_for_each_system(
    tiny_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = run_step_profile(
        tiny_registry, "tiny@1", threads=1, concurrency=[1, 2], new_tokens=8, draft="ngram"
    )
    assert rc == 0
    out = capsys.readouterr().out
    head = (
        "| system | conc | tok/s | steps | step ms | prefill | compact | draft | forward | pick "
        "| emit | flush |"
    )
    assert head in out
    rows = [line for line in out.splitlines() if line.startswith(("| plain", "| draft"))]
    assert [r.split("|")[1:3] for r in rows] == [
        [" plain ", " 1 "], [" draft ", " 1 "], [" plain ", " 2 "], [" draft ", " 2 "]
    ]  # fmt: skip
    for row in rows:
        prefill, forward = float(row.split("|")[6]), float(row.split("|")[9])
        assert forward > 0 and prefill > 0  # every step ran the model, every run a prefill
    # The draft policy's measured pass costs and what a draft must reach to pay on them.
    assert "forward pass by tokens in it: 1:" in out
    assert "acceptance a draft needs to pay at batch 1 (free drafts): k=1: " in out
    assert "adaptive policy: " in out
