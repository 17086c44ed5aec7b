"""A native crash in one model's engine, seen through gRPC: the server, health and the
other models stay up; the stream in flight ends UNAVAILABLE naming the model and signal."""

from __future__ import annotations

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
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread, publish_tiny


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def two_models(tiny_registry: Path, tmp_path: Path) -> Any:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    publish_tiny(root, "other", seed=4)
    config = tiny_server_config(root, models=("tiny", "other"), restart_backoff_s=1.5)
    server = ServerThread(config).start()
    yield server
    server.stop()


def test_a_segfault_mid_stream_is_unavailable_and_the_model_comes_back(two_models: Any) -> None:
    with Client(two_models.target, retries=0, timeout=60) as c:
        info = c.model_info("tiny")
        assert info.engine_pid not in (0, os.getpid())  # the server holds no weights
        assert c.health("tiny") == "SERVING" and c.health("other") == "SERVING"
        errors: list[BaseException] = []
        started = threading.Event()

        def stream() -> None:
            try:
                for _ in c.stream("hello", model="tiny", max_new_tokens=60, ignore_eos=True):
                    started.set()
                    time.sleep(0.01)
            except Unavailable as exc:
                errors.append(exc)

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        os.kill(info.engine_pid, signal.SIGSEGV)
        reader.join(30)
        assert errors, "the stream did not fail"
        assert "tiny@1" in str(errors[0]) and "SIGSEGV" in str(errors[0])
        # While tiny restarts, it says so, and the other model serves as before.
        _wait(lambda: c.health("tiny") == "NOT_SERVING", "health still SERVING", 1.0)
        assert c.model_info("tiny").state == "RESTARTING"
        assert c.health("other") == "SERVING" and c.health() == "SERVING"
        assert c.generate("hi", model="other", max_new_tokens=4).generated_tokens >= 1
        _wait(lambda: c.health("tiny") == "SERVING", "tiny never served again")
        again = c.model_info("tiny")
        assert again.engine_restarts == 1 and again.engine_pid != info.engine_pid
        g = c.generate("hello", model="tiny", max_new_tokens=4, ignore_eos=True)
        assert g.generated_tokens == 4


def test_the_server_is_not_serving_while_every_engine_is_down(two_models: Any) -> None:
    with Client(two_models.target, retries=0, timeout=60) as c:
        for name in ("tiny", "other"):
            os.kill(c.model_info(name).engine_pid, signal.SIGKILL)
        _wait(lambda: c.health() == "NOT_SERVING", "still SERVING with no engine up", 5)
        _wait(lambda: c.health() == "SERVING", "never came back")


def test_a_non_finite_score_is_internal_the_detail_logged_with_the_request_id(
    tiny_registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine's words stay in the log: the client reads a short, generic line that
    names the request id to look for there."""
    from slimserve.clients import ServerError

    config = tiny_server_config(
        tiny_registry, backend_plugins=("tests.engine.faults:nan_scores",), dtype="float32"
    )
    server = ServerThread(config).start()
    try:
        with Client(server.target, retries=0, timeout=60) as c:
            assert c.model_info().plan.startswith("tests.engine.faults:nan_scores")
            with pytest.raises(ServerError) as err:
                c.score("is this fraud?", [" yes", " no"], request_id="nan-score-1")
            assert err.value.code == "INTERNAL"
            assert err.value.details == "internal error (request id nan-score-1)"
            assert c.generate("hello", max_new_tokens=3).generated_tokens >= 1  # still serving
    finally:
        server.stop()
    logged = [r.getMessage() for r in caplog.records if "nan-score-1" in r.getMessage()]
    assert any("tiny@1" in m and "non-finite" in m for m in logged), logged


def test_the_http_door_sends_internal_errors_short_and_logs_them_with_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from slimserve.engine.errors import EngineFailure
    from slimserve.server import logs
    from slimserve.server.openai.errors import error_body

    token = logs.REQUEST_ID.set("http-rid-7")
    try:
        for exc in (EngineFailure("tiny@1: non-finite scores"), KeyError("/srv/secret/path")):
            status, body = error_body(exc)
            assert status.http == 500
            assert body["error"]["message"] == "internal error (request id http-rid-7)"
    finally:
        logs.REQUEST_ID.reset(token)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "http-rid-7" in logged and "non-finite" in logged and "/srv/secret/path" in logged


def test_unloading_the_last_model_turns_health_not_serving(tiny_registry: Path) -> None:
    server = ServerThread(tiny_server_config(tiny_registry, allow_model_control=True)).start()
    try:
        with Client(server.target, retries=0, timeout=60) as c:
            assert c.health() == "SERVING"
            c.unload_model("tiny")
            _wait(lambda: c.health() == "NOT_SERVING", "a server with no model says SERVING", 5)
            assert c.health("tiny") == "NOT_SERVING"
    finally:
        server.stop()
