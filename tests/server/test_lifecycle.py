"""Model swaps, failed loads, alias moves, deadlines and out-of-memory, through gRPC.

The model, the engine process and the server are real, as deployed. Where a test needs a
request in flight while it acts, or a device that runs out of memory, the engine process
serves the backend the test steers (`tests.engine.faults.Controls`): it stops at a known
token until the test lets it go, or raises `torch.OutOfMemoryError` once; every step
still runs the real forward pass.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from slimserve.clients import (
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Overloaded,
    ServerError,
)
from slimserve.registry.store import Registry
from slimserve.server.config import Limits
from tests.conftest import steered_server, tiny_server_config
from tests.engine.faults import Controls
from tests.helpers import ServerThread, publish_tiny, wait_until

LONG = Limits(max_new_tokens=120, default_max_new_tokens=16)


def _registry_with_two_versions(tiny_registry: Path, tmp_path: Path) -> Path:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    publish_tiny(root, "tiny", seed=9)  # tiny@2
    return root


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_swap_lets_in_flight_stream_finish_on_the_old_version(
    tiny_registry: Path, tmp_path: Path
) -> None:
    source = _registry_with_two_versions(tiny_registry, tmp_path)
    with steered_server(
        source, tmp_path / "steered", models=("tiny@1",), limits=LONG, allow_model_control=True
    ) as (server, controls):
        old_engine = server.server.models.get("tiny").engine
        old_pid = old_engine.pid
        chunks: list[Any] = []

        def consume() -> None:
            with Client(server.target, retries=0, timeout=60) as c:
                chunks.extend(c.stream("hello", max_new_tokens=100, ignore_eos=True))

        controls.pause_at_token(5)
        reader = threading.Thread(target=consume)
        reader.start()
        controls.wait_paused()  # tiny@1's stream is in flight: 4 tokens out, 96 to come
        with Client(server.target, retries=0, timeout=60) as c:
            assert c.load_model("tiny@2").ref == "tiny@2"
            new = c.generate("hello", max_new_tokens=3, ignore_eos=True)
            assert new.model == "tiny@2"
            assert c.score("the quick", [" fox"]).model == "tiny@2"
            assert c.model_info().ref == "tiny@2"
            assert c.model_info().engine_pid != old_pid
        assert reader.is_alive() and not _gone(old_pid)  # the old version waits for it
        controls.release()
        reader.join(60)
        assert chunks[0].model == "tiny@1"
        assert chunks[-1].stop_reason == "MAX_TOKENS" and chunks[-1].generated_tokens == 100
        # The old version's engine process is retired once its last stream is done.
        wait_until(lambda: _gone(old_pid), "old version never retired")
        assert not old_engine.serving


def _publish_broken(root: Path) -> int:
    """A version whose files verify but whose config does not match its weights."""
    reg = Registry(root)
    src = reg.get("tiny", "1")
    with reg.staging() as staged:
        for rel in src.files:
            shutil.copy(src.path / rel, staged / rel)
            (staged / rel).chmod(0o644)
        cfg = json.loads((staged / "config.json").read_text())
        cfg["hidden_size"] = 32
        (staged / "config.json").write_text(json.dumps(cfg))
        keep = {k: v for k, v in src.manifest.items()
                if k not in ("name", "version", "created_at", "files", "format")}  # fmt: skip
        return reg.publish("tiny", staged, keep).version


def test_failed_loads_leave_the_old_version_serving(tiny_registry: Path, tmp_path: Path) -> None:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    assert _publish_broken(root) == 2
    server = ServerThread(
        tiny_server_config(root, models=("tiny@1",), allow_model_control=True)
    ).start()
    try:
        with Client(server.target, retries=0, timeout=60) as c:
            with pytest.raises(ServerError, match="tiny@2 could not be loaded") as err:
                c.load_model("tiny@2")
            assert err.value.code == "FAILED_PRECONDITION"
            with pytest.raises(NotFound, match="no version 7"):
                c.load_model("tiny@7")
            with pytest.raises(NotFound):
                c.load_model("missing@1")
            for ref in ("tiny@../../etc", "tiny@Prod", "../tiny@1"):
                with pytest.raises(InvalidArgument):
                    c.load_model(ref)
            assert c.health() == "SERVING"
            assert [m.ref for m in c.models()] == ["tiny@1"]
            assert c.generate("hello", max_new_tokens=2, ignore_eos=True).model == "tiny@1"
    finally:
        server.stop()


def test_alias_move_then_load_by_alias(tiny_registry: Path, tmp_path: Path) -> None:
    root = _registry_with_two_versions(tiny_registry, tmp_path)
    reg = Registry(root)
    reg.set_alias("tiny", "production", 1)
    server = ServerThread(
        tiny_server_config(root, models=("tiny@production",), allow_model_control=True)
    ).start()
    try:
        with Client(server.target, retries=0, timeout=60) as c:
            assert c.generate("hi", model="tiny@production", max_new_tokens=1).model == "tiny@1"
            reg.set_alias("tiny", "production", 2)
            # The server never answers for an alias with a version it is not serving.
            with pytest.raises(NotFound, match="version 2, which is not loaded"):
                c.generate("hi", model="tiny@production", max_new_tokens=1)
            assert c.generate("hi", model="tiny", max_new_tokens=1).model == "tiny@1"
            info = c.load_model("tiny@production")
            assert info.ref == "tiny@2" and info.aliases == ("production",)
            assert c.generate("hi", model="tiny@production", max_new_tokens=1).model == "tiny@2"
            assert c.score("hi", [" a"], model="tiny@production").model == "tiny@2"
            with pytest.raises(NotFound, match="version 1 is not loaded"):
                c.generate("hi", model="tiny@1", max_new_tokens=1)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def steered(
    tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, Controls]]:
    with steered_server(
        tiny_registry, tmp_path_factory.mktemp("steered") / "reg", limits=LONG
    ) as s:
        yield s


def test_deadline_frees_the_engine_slot_at_the_next_step(
    steered: tuple[ServerThread, Controls],
) -> None:
    server, controls = steered
    engine = server.server.models.get("tiny").engine
    before = engine.stats()

    def in_flight_past_its_deadline(call: Callable[[Client], Any]) -> None:
        """`call` stops at its third token; its deadline passes while it waits there."""
        controls.pause_at_token(3)
        with Client(server.target, retries=0, timeout=60) as c, pytest.raises(DeadlineExceeded):
            call(c)
        controls.wait_paused()
        # The server has given up on the call (so its deadline has passed) before the
        # engine takes its next step.
        wait_until(lambda: server.server.in_flight.count == 0, "the call never ended")
        controls.release()

    try:
        in_flight_past_its_deadline(
            lambda c: c.generate("hello", max_new_tokens=100, ignore_eos=True, timeout=0.5)
        )
        in_flight_past_its_deadline(
            lambda c: list(c.stream("hello", max_new_tokens=100, ignore_eos=True, timeout=0.5))
        )
    finally:
        controls.release()
    # The engine stops them for their deadline, and says so (not CANCELLED).
    expired = before.finished.get("DEADLINE", 0) + 2
    wait_until(lambda: engine.stats().finished.get("DEADLINE", 0) == expired, "still running")
    after = engine.stats()
    assert after.running == 0 and after.queued == 0 and after.free_slots == 4
    assert after.finished.get("CANCELLED", 0) == before.finished.get("CANCELLED", 0)
    # Each stopped at the step after its pause: 3 tokens (4 at most), never the 100 asked.
    assert after.generated_tokens - before.generated_tokens <= 2 * 4


@pytest.mark.parametrize("stage", ["prefill", "decode", "score"])
def test_out_of_memory_fails_only_that_request(
    steered: tuple[ServerThread, Controls], stage: str
) -> None:
    server, controls = steered
    engine = server.server.models.get("tiny").engine
    with Client(server.target, retries=0, timeout=60) as c:
        call = {
            "prefill": lambda: c.generate("hello", max_new_tokens=4),
            "decode": lambda: list(c.stream("hello", max_new_tokens=8, ignore_eos=True)),
            "score": lambda: c.score("hello", [" a", " b"]),
        }[stage]
        controls.oom_once(stage)
        with pytest.raises(Overloaded, match="out of memory") as err:
            call()
        assert err.value.code == "RESOURCE_EXHAUSTED"
        assert controls.oom_fired(stage)
        # The engine process lives on (no restart), the slot came back, the next request
        # and the next Score are served.
        assert c.model_info().engine_restarts == 0
        assert c.generate("hello", max_new_tokens=3, ignore_eos=True).generated_tokens == 3
        assert len(c.score("hello", [" a", " b"]).scores) == 2
        stats = engine.stats()
        assert stats.running == 0 and stats.free_slots == 4
        assert c.health() == "SERVING"
