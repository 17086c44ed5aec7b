"""The engine in its own process: real children, real signals, real restarts.

Each test loads the tiny model through the model manager as the server does, with the
engine in a child process, and then kills that process (SIGSEGV, SIGKILL) or gives it a
backend that crashes (`tests.engine.faults`), and checks what the server side sees.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slimserve.engine.config import ModelConfig
from slimserve.engine.errors import LoadFailed, NotReady
from slimserve.engine.manager import ModelManager
from slimserve.engine.qualify import verdicts_path
from slimserve.engine.types import Event, GenerationRequest, Prompt, SamplingParams, StopParams
from slimserve.registry.store import Registry
from tests.engine.faults import trigger_file
from tests.helpers import publish_tiny


def _config(**overrides: Any) -> ModelConfig:
    base: dict[str, Any] = dict(
        device="cpu", max_batch=2, max_seq_len=128, backend="llama", restart_backoff_s=0.05
    )
    return ModelConfig.of(**{**base, **overrides})


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)
        if ev.finish is not None or ev.error is not None:
            self.done.set()


def _request(max_new: int = 8, rid: str = "r") -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt=Prompt(ids=(5, 6, 7)),
        sampling=SamplingParams(),
        stopping=StopParams(max_new_tokens=max_new, ignore_eos=True),
    )


def _generate(manager: ModelManager, name: str = "tiny") -> Event:
    sink = Collector()
    manager.get(name).engine.submit(_request(), sink)
    assert sink.done.wait(30)
    return sink.events[-1]


@pytest.fixture
def registry(tmp_path: Path, tiny_registry: Path) -> Path:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    return root


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_a_dead_engine_fails_its_requests_at_once_and_comes_back(registry: Path, sig: int) -> None:
    health: list[tuple[str, bool]] = []
    manager = ModelManager(
        Registry(registry), _config(), on_health=lambda n, s: health.append((n, s))
    )
    try:
        model = manager.load("tiny")
        engine: Any = model.engine
        pid = engine.pid
        assert pid != os.getpid() and model.info.in_process is False  # weights live elsewhere
        sink = Collector()
        engine.submit(_request(max_new=100_000, rid="long"), sink)
        _wait(lambda: len(sink.events) >= 2, "the stream never started")
        t0 = time.monotonic()
        engine.kill(sig)
        assert sink.done.wait(10)
        assert time.monotonic() - t0 < 5  # at once, not at a timeout
        error = sink.events[-1].error
        assert isinstance(error, NotReady)
        assert "tiny@1" in str(error) and signal.Signals(sig).name in str(error)
        _wait(lambda: ("tiny", False) in health, "health never turned NOT_SERVING")
        _wait(lambda: manager.serving("tiny") and engine.pid != pid, "never restarted")
        assert health[-1] == ("tiny", True)
        end = _generate(manager)
        assert end.finish is not None and end.finish.generated_tokens == 8
    finally:
        manager.shutdown()


def test_other_models_are_untouched_by_a_crash(registry: Path) -> None:
    publish_tiny(registry, "other", seed=3)
    manager = ModelManager(Registry(registry), _config(restart_backoff_s=2.0))
    try:
        manager.load("tiny")
        manager.load("other")
        manager.get("tiny").engine.kill(signal.SIGSEGV)  # type: ignore[attr-defined]
        _wait(lambda: not manager.serving("tiny"), "tiny still serving")
        with pytest.raises(NotReady, match="restarting"):
            manager.get("tiny").engine.submit(_request(), Collector())
        assert manager.serving("other")
        end = _generate(manager, "other")
        assert end.finish is not None and end.finish.generated_tokens == 8
    finally:
        manager.shutdown()


def test_a_backend_that_aborts_while_loading_is_a_load_failure(registry: Path) -> None:
    config = _config(
        backend="auto", qualify=False, backend_plugins=("tests.engine.faults:abort_at_load",)
    )
    manager = ModelManager(Registry(registry), config)
    try:
        with pytest.raises(LoadFailed, match=r"tiny@1 died while loading \(killed by SIGABRT\)"):
            manager.load("tiny")
        assert not manager.all()
    finally:
        manager.shutdown()


@pytest.mark.slow
def test_only_the_plans_own_crashes_mark_it_bad_and_the_verdict_expires(registry: Path) -> None:
    """Before: any three deaths in 5 minutes (an operator's kills, the OOM killer) marked the
    plan crash-loop in the verdict cache for good."""
    plugin = "tests.engine.faults:crash_on_trigger"
    config = _config(
        dtype="float32", backend_plugins=(plugin,), max_crashes=2, crash_verdict_ttl_s=8.0
    )
    manager = ModelManager(Registry(registry), config)
    try:
        model = manager.load("tiny")
        assert model.info.plan == f"{plugin}/float32"  # qualified, and named: preferred
        for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):  # an operator's, an OOM
            engine: Any = manager.get("tiny").engine
            pid = engine.pid
            engine.kill(sig)
            _wait(lambda p=pid, e=engine: manager.serving("tiny") and e.pid != p, "restarted?")
        assert manager.get("tiny").info.plan == f"{plugin}/float32"  # none of them counted
        trigger_file(registry).touch()
        end = _generate(manager)
        assert isinstance(end.error, NotReady) and "SIGSEGV" in str(end.error)
        # The restart crashes too (its warm-up prefill): the second crash of the plan's own
        # within the window marks it bad, and the restart after it serves the next plan.
        _wait(lambda: manager.serving("tiny"), "never served again")
        info = manager.get("tiny").info
        assert info.plan != f"{plugin}/float32"
        why = info.refused[f"{plugin}/float32"]
        assert why.startswith("crash-loop") and "SIGSEGV" in why and "SIGKILL" not in why
        end = _generate(manager)  # the trigger is still there; the new plan ignores it
        assert end.finish is not None and end.finish.generated_tokens == 8
    finally:
        manager.shutdown()
        trigger_file(registry).unlink(missing_ok=True)
    verdicts = json.loads(verdicts_path(registry).read_text())["verdicts"]
    (bad,) = [v for k, v in verdicts.items() if k.endswith(f"{plugin}/float32")]
    assert bad["status"] == "crash-loop" and time.time() < bad["expires_at"] < time.time() + 9
    # Once it expires, the plan is qualified again and serves again.
    time.sleep(max(0.0, bad["expires_at"] - time.time()) + 0.1)
    again = ModelManager(Registry(registry), config)
    try:
        assert again.load("tiny").info.plan == f"{plugin}/float32"
    finally:
        again.shutdown()


def test_an_in_process_engine_whose_loop_dies_stops_serving(registry: Path) -> None:
    health: list[tuple[str, bool]] = []
    manager = ModelManager(
        Registry(registry),
        _config(engine_process=False),
        on_health=lambda n, s: health.append((n, s)),
    )
    try:
        engine: Any = manager.load("tiny").engine.engine  # the scheduler behind the frontend

        def broken() -> None:
            raise RuntimeError("a bug in the loop itself")

        engine._reap = broken  # the loop, not one request
        end = _generate(manager)
        assert isinstance(end.error, NotReady) and "loop failed" in str(end.error)
        assert health[-1] == ("tiny", False) and not manager.serving("tiny")
    finally:
        manager.shutdown()
