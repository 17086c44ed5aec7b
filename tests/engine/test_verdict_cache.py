"""The qualification cache is data: a tampered `verdicts.json` names no code that runs,
cannot pass off a failed plan as qualified, and an invalid one is ignored with one
warning. `slimserve qualify --clear` forgets it."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from slimserve.engine import qualify
from slimserve.engine.backends.select import Plan, build_backend
from slimserve.engine.config import ModelConfig
from slimserve.engine.manager import ModelManager
from slimserve.engine.qualify import verdicts_path
from slimserve.registry.store import Registry

FAULTS = "tests.engine.faults"
WRONG = f"{FAULTS}:wrong_logits"
#: Not configured anywhere: if it ever ran, loading would die by SIGABRT.
INJECTED = f"{FAULTS}:abort_at_load"


@pytest.fixture
def registry(tmp_path: Path, tiny_registry: Path) -> Path:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    return root


def _config() -> ModelConfig:
    # The pinned reference plus one plugin to qualify: two throwaway processes at most.
    return ModelConfig.of(
        device="cpu", max_batch=2, max_seq_len=128, backend="llama", dtype="float32",
        backend_plugins=(WRONG,),
    )  # fmt: skip


def _load(registry: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[Any]]:
    """Load tiny as the server does; (its info, the plans qualified in child processes)."""
    children: list[Any] = []
    real = qualify._run_child

    def counted(spec: Any, plan: Any, timeout: float) -> Any:
        children.append(plan)
        return real(spec, plan, timeout)

    monkeypatch.setattr(qualify, "_run_child", counted)
    manager = ModelManager(Registry(registry), _config())
    try:
        return manager.load("tiny").info, children
    finally:
        manager.shutdown()


def _entry(data: dict[str, Any], part: str, suffix: str) -> tuple[str, Any]:
    return next((k, v) for k, v in data[part].items() if k.endswith(suffix))


def test_a_tampered_cache_runs_no_code_and_serves_no_unqualified_plan(
    registry: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a plan naming any "module:attr" in the survey was imported and called in the
    engine, and a verdict edited to "ok" served a plan that had failed."""
    info, children = _load(registry, monkeypatch)
    assert info.refused[f"{WRONG}/float32"].startswith("wrong")
    assert info.plan == "llama/float32"
    path = verdicts_path(registry)
    data = json.loads(path.read_text())
    _, survey = _entry(data, "surveys", WRONG)
    injected = Plan(backend=INJECTED, dtype="float32")
    survey["plans"].insert(0, injected.to_dict())  # first: preferred, were it allowed
    prefix, wrong = _entry(data, "verdicts", f"{WRONG}/float32")
    wrong["status"] = "ok"  # its measured figures still fail qualification
    fake = {**wrong, "plan": injected.to_dict(), "agreement": 1.0, "ppl_ratio": 1.0}
    data["verdicts"][prefix.replace(f"{WRONG}/float32", injected.key)] = fake
    path.write_text(json.dumps(data))
    caplog.set_level(logging.WARNING, logger="slimserve.engine.qualify")
    info, children = _load(registry, monkeypatch)
    assert info.plan == "llama/float32"  # loaded at all: abort_at_load never ran
    assert injected.key not in info.refused and all(
        p is None or p.backend != INJECTED for p in children
    )
    assert [p.key for p in children if p is not None] == [f"{WRONG}/float32"]  # requalified
    assert info.refused[f"{WRONG}/float32"].startswith("wrong")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert INJECTED in warned and "not among the configured backend plugins" in warned
    assert "fail qualification" in warned
    _, again = _entry(json.loads(path.read_text()), "verdicts", f"{WRONG}/float32")
    assert again["status"] == "wrong"


@pytest.mark.slow
def test_an_invalid_cache_is_ignored_with_one_warning_and_rewritten(
    registry: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _load(registry, monkeypatch)
    path = verdicts_path(registry)
    good = json.loads(path.read_text())
    key, verdict = _entry(good, "verdicts", f"{WRONG}/float32")
    code = {**good, "verdicts": {key: {**verdict, "plan": {"backend": "os:system; rm -rf /"}}}}
    extra = {**good, "verdicts": {key: {**verdict, "run": "os:system"}}}
    caplog.set_level(logging.WARNING, logger="slimserve.engine.qualify")
    for bad in (json.dumps(code), json.dumps(extra), "{truncated", '{"x": 1}', "[" * 100_000):
        path.write_text(bad)
        caplog.clear()
        cache = qualify.VerdictCache(path)
        for _ in range(3):
            assert cache.read() == {"format": qualify.CACHE_FORMAT, "surveys": {}, "verdicts": {}}
        invalid = [r for r in caplog.records if "is invalid" in r.getMessage()]
        assert len(invalid) == 1, [r.getMessage() for r in caplog.records]
    path.write_text(json.dumps(code))
    info, children = _load(registry, monkeypatch)
    assert info.plan == "llama/float32"
    assert children[0] is None and len(children) == 2  # surveyed and qualified again
    assert json.loads(path.read_text())["format"] == qualify.CACHE_FORMAT  # rewritten, valid


def test_the_engine_builds_no_plugin_the_configuration_did_not_name() -> None:
    for name in ("os:system", INJECTED):
        with pytest.raises(ValueError, match="not among the configured backend plugins"):
            build_backend(None, ModelConfig.of(), 128, None, Plan(backend=name))


@pytest.mark.slow
def test_qualify_clear_forgets_the_verdicts(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _load(registry, monkeypatch)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "slimserve.cli", "qualify", *args, "--registry", str(registry)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    shown = cli("--model", "tiny@1")
    assert shown.returncode == 0 and f"{WRONG}/float32: wrong" in shown.stdout
    cleared = cli("--clear")
    found = re.search(r"cleared (\d+) cached", cleared.stdout)
    assert cleared.returncode == 0 and found and int(found[1]) >= 2, cleared.stdout
    data = json.loads(verdicts_path(registry).read_text())
    assert data["surveys"] == {} and data["verdicts"] == {}
    _, children = _load(registry, monkeypatch)
    assert len(children) == 2  # the next load qualifies again
