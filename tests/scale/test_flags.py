"""`--ray` on `serve` and `fraud score`: bad settings are refused before any cluster is
touched, and the Serve options are the ones the flags name (no Ray cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.cli import main


def test_autoscale_needs_min_below_max(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "tiny", "--ray", "auto", "--autoscale", "4:1"])
    assert exit_.value.code == 2
    assert "use MIN:MAX replicas" in capsys.readouterr().err


def test_fraud_score_on_ray_refuses_explain_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "payments.csv"
    rows.write_text("transaction_id\n")
    code = main(["fraud", "score", str(rows), "--ray", "ray://nowhere.invalid:10001",
                 "--explain", "--model", "tiny"])  # fmt: skip
    assert code == 2
    assert "--explain streams through one server" in capsys.readouterr().err


def test_serve_options_follow_the_scaling_settings() -> None:
    pytest.importorskip("ray.serve", reason="the ray extra is not installed (scripts/setup)")
    from slimserve.scale.serve_app import Scaling

    fixed = Scaling(replicas=3, max_ongoing=24, max_queued=64, cpus=2).options()
    assert fixed == {
        "num_replicas": 3,
        "max_ongoing_requests": 24,
        "max_queued_requests": 64,
        "ray_actor_options": {"num_cpus": 2},
    }
    scaled = Scaling(replicas=2, autoscale=(1, 8), target_ongoing=12).options()
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 2,
        "max_replicas": 8,
        "target_ongoing_requests": 12,
    }
    with pytest.raises(ValueError, match="autoscale"):
        Scaling(autoscale=(3, 1))
