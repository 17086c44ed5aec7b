"""An engine process that hangs, or is killed again and again, through a real server and
client: the watchdog restarts a stuck step, restarts leak no descriptors, and an
operator's kills never mark the plan bad."""

from __future__ import annotations

import gc
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

from slimserve.clients import Client, Unavailable
from slimserve.engine.qualify import verdicts_path
from tests.conftest import tiny_server_config
from tests.engine.faults import hang_trigger
from tests.helpers import ServerThread


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _serving(c: Client, old_pid: int) -> bool:
    try:
        return c.health("tiny") == "SERVING" and c.model_info("tiny").engine_pid != old_pid
    except Unavailable:
        return False


class _Stream:
    """A long stream on a thread, and how it ended."""

    def __init__(self, c: Client) -> None:
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, args=(c,))
        self.thread.start()
        assert self.started.wait(60), "the stream never started"

    def _read(self, c: Client) -> None:
        try:
            for _ in c.stream("hello", max_new_tokens=64, ignore_eos=True, timeout=120):
                self.started.set()
        except BaseException as exc:
            self.error = exc
            self.started.set()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream is still running"


def _hanging(root: Path, **overrides: Any) -> Any:
    """The tiny model on `hang_on_trigger` (the static choice: no qualification run)."""
    return tiny_server_config(
        root,
        backend="auto",
        qualify=False,
        backend_plugins=("tests.engine.faults:hang_on_trigger",),
        dtype="float32",
        restart_backoff_s=0.05,
        **overrides,
    )


def test_a_hung_step_is_killed_and_the_engine_restarted(
    tiny_registry: Path, tmp_path: Path
) -> None:
    """Before: a step that never ended held its slot and every request behind it for good,
    with health saying SERVING."""
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    server = ServerThread(_hanging(root, step_timeout_s=2.0)).start()
    try:
        with Client(server.target, retries=0, timeout=60) as c:
            info = c.model_info("tiny")
            assert info.plan.startswith("tests.engine.faults:hang_on_trigger")
            hang_trigger(root).touch()  # its first decode step hangs
            stream = _Stream(c)
            _wait(lambda: not hang_trigger(root).exists(), "the step never hung")
            t0 = time.monotonic()
            stream.join(30)
            ended_in = time.monotonic() - t0
            assert isinstance(stream.error, Unavailable), stream.error
            assert "a step ran over 2 s" in str(stream.error)
            assert ended_in < 8, f"the hung stream ended after {ended_in:.1f} s"
            _wait(lambda: _serving(c, info.engine_pid), "never served again")
            again = c.model_info("tiny")
            assert again.engine_restarts == 1
            g = c.generate("hello", max_new_tokens=4, ignore_eos=True)
            assert g.generated_tokens == 4
    finally:
        server.stop()
        hang_trigger(root).unlink(missing_ok=True)


@pytest.mark.parametrize(
    "kills",
    [6, pytest.param(20, marks=pytest.mark.slow, id="20")],  # the 20 in the slow tier
)
def test_repeated_operator_kills_leak_no_descriptors_and_mark_nothing_bad(
    tiny_registry: Path, tmp_path: Path, kills: int
) -> None:
    """Before: each restart kept the dead process's pipe and sentinel (3 descriptors) until
    the cycle collector happened to run; and every kill counted as a crash of the plan."""
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    server = ServerThread(_hanging(root, max_crashes=3)).start()
    gc.disable()  # descriptors must not wait for the cycle collector
    try:
        with Client(server.target, retries=0, timeout=60) as c:

            def restart(sig: int) -> None:
                pid = c.model_info("tiny").engine_pid
                hang_trigger(root).touch()  # a request in flight when it dies: its error's
                stream = _Stream(c)  # traceback then holds the dead engine in a cycle
                _wait(lambda: not hang_trigger(root).exists(), "the step never hung")
                os.kill(pid, sig)
                stream.join(30)
                assert isinstance(stream.error, Unavailable), stream.error
                _wait(lambda: _serving(c, pid), "never served again")

            restart(signal.SIGKILL)  # the forkserver and the first restart's threads exist
            before = len(os.listdir("/proc/self/fd"))
            # At least twice the crashes that mark a plan bad (max_crashes=3), half of them
            # SIGTERM; a leak of one descriptor a restart shows as +kills (it was 3 a restart).
            for i in range(kills):
                restart(signal.SIGKILL if i % 2 else signal.SIGTERM)
            after = len(os.listdir("/proc/self/fd"))
            assert after <= before + 1, f"descriptors {before} -> {after} over {kills} restarts"
            assert c.model_info("tiny").engine_restarts == kills + 1
            assert c.generate("hello", max_new_tokens=2).generated_tokens >= 1
    finally:
        gc.enable()
        server.stop()
        hang_trigger(root).unlink(missing_ok=True)
    cache = verdicts_path(root)
    verdicts = json.loads(cache.read_text())["verdicts"] if cache.exists() else {}
    assert not [v for v in verdicts.values() if v["status"] == "crash-loop"]
