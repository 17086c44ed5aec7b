"""A native crash in one model's engine, seen through gRPC: the server, health and the
other models stay up; the stream in flight ends UNAVAILABLE naming the model and signal."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slimserve.clients import Client, Unavailable
from tests.conftest import steered_server, tiny_server_config
from tests.engine.faults import Controls
from tests.helpers import ServerThread, publish_tiny, wait_until


@pytest.fixture
def two_models(tiny_registry: Path, tmp_path: Path) -> Iterator[tuple[ServerThread, Controls]]:
    """Two models served by the steered backend (`tests.engine.faults.Controls`), each in its
    own engine process."""
    source = tmp_path / "source"
    shutil.copytree(tiny_registry, source, symlinks=True)
    publish_tiny(source, "other", seed=4)
    with steered_server(
        source, tmp_path / "reg", models=("tiny", "other"), restart_backoff_s=0.2
    ) as s:
        yield s


def test_a_segfault_mid_stream_is_unavailable_and_the_model_comes_back(
    two_models: tuple[ServerThread, Controls],
) -> None:
    server, controls = two_models
    with Client(server.target, retries=0, timeout=60) as c:
        info = c.model_info("tiny")
        assert info.engine_pid not in (0, os.getpid())  # the server holds no weights
        assert c.health("tiny") == "SERVING" and c.health("other") == "SERVING"
        errors: list[BaseException] = []
        chunks: list[Any] = []

        def stream() -> None:
            # Retries on: a stream is never retried after its first message (the retry
            # would find tiny RESTARTING, or start the answer over).
            with Client(server.target, retries=3, timeout=60) as retrying:
                try:
                    for chunk in retrying.stream(
                        "hello", model="tiny", max_new_tokens=60, ignore_eos=True
                    ):
                        chunks.append(chunk)
                except Unavailable as exc:
                    errors.append(exc)

        controls.pause_at_token(3)
        reader = threading.Thread(target=stream)
        reader.start()
        controls.wait_paused()  # two tokens out, 58 to come: the engine dies mid-stream
        controls.hold_loads()  # the restarted engine waits until the test has looked
        os.kill(info.engine_pid, signal.SIGSEGV)
        controls.killed()
        reader.join(30)
        assert errors, "the stream did not fail"
        assert "tiny@1" in str(errors[0]) and "SIGSEGV" in str(errors[0])
        assert len(errors) == 1 and 1 <= len(chunks) < 60
        assert chunks[-1].generated_tokens < 60
        # While tiny restarts, it says so, and the other model serves as before.
        wait_until(lambda: c.health("tiny") == "NOT_SERVING", "health still SERVING")
        assert c.model_info("tiny").state == "RESTARTING"
        assert c.health("other") == "SERVING" and c.health() == "SERVING"
        assert c.generate("hi", model="other", max_new_tokens=4).generated_tokens >= 1
        controls.let_loads()
        wait_until(lambda: c.health("tiny") == "SERVING", "tiny never served again", 60)
        again = c.model_info("tiny")
        assert again.engine_restarts == 1 and again.engine_pid != info.engine_pid
        g = c.generate("hello", model="tiny", max_new_tokens=4, ignore_eos=True)
        assert g.generated_tokens == 4


def test_the_server_is_not_serving_while_every_engine_is_down(
    two_models: tuple[ServerThread, Controls],
) -> None:
    server, controls = two_models
    with Client(server.target, retries=0, timeout=60) as c:
        controls.hold_loads()  # neither comes back until the test has looked
        for name in ("tiny", "other"):
            os.kill(c.model_info(name).engine_pid, signal.SIGKILL)
        wait_until(lambda: c.health() == "NOT_SERVING", "still SERVING with no engine up")
        controls.let_loads()
        wait_until(lambda: c.health() == "SERVING", "never came back", 60)


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
            wait_until(lambda: c.health() == "NOT_SERVING", "a server with no model says SERVING")
            assert c.health("tiny") == "NOT_SERVING"
    finally:
        server.stop()
