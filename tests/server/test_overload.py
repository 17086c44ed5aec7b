"""A full engine, a drain and a client that leaves, on every door, through the engine
process as deployed.

The engine process is the only judge of admission: a request beyond its queue comes back
as an `Overloaded` event, which each door renders (gRPC and KServe RESOURCE_EXHAUSTED,
HTTP 429 with Retry-After). To fill the engine without racing it, its backend is the one
the test steers (`tests.engine.faults.Controls`): the stream holding the only slot stops
at its third token until the test lets it go, so the engine is full for exactly as long
as the test looks at it.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from slimserve.clients import Client, Overloaded, Unavailable
from slimserve.server.config import Limits
from tests.conftest import steered_server
from tests.engine.faults import Controls
from tests.helpers import ServerThread, openai_client, wait_until

#: A small body limit, so a body over it is sent whole before the 413 is read.
LONG = Limits(max_new_tokens=120, default_max_new_tokens=16, max_message_bytes=64 * 1024)


#: One slot, one place in the queue, every door.
ONE_SLOT: dict[str, Any] = dict(max_batch=1, max_queue=1, limits=LONG, http=True)


@pytest.fixture(scope="module")
def full(
    tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, Controls]]:
    with steered_server(tiny_registry, tmp_path_factory.mktemp("full") / "reg", **ONE_SLOT) as s:
        yield s


def _oai(server: ServerThread) -> openai.OpenAI:
    client: openai.OpenAI = openai_client(server, api_key="none")
    return client


class Background:
    """Calls on their own threads; what each returned or raised, by name."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.threads: list[threading.Thread] = []

    def run(self, name: str, call: Callable[[], Any]) -> None:
        def target() -> None:
            try:
                self.results[name] = call()
            except Exception as exc:  # read by the test
                self.results[name] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> dict[str, Any]:
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a call never ended"
        return self.results


def _stream_tokens(target: str, n: int) -> int:
    with Client(target, retries=0, timeout=60) as c:
        chunks = list(c.stream("hello", max_new_tokens=n, ignore_eos=True))
    return int(chunks[-1].generated_tokens)


def _fill(server: ServerThread, controls: Controls, calls: Background) -> None:
    """The slot taken by a stream stopped at its third token, the queue by a request."""
    engine = server.server.models.get("tiny").engine
    controls.pause_at_token(3)
    calls.run("running", lambda: _stream_tokens(server.target, 40))
    controls.wait_paused()
    calls.run("queued", lambda: _stream_tokens(server.target, 5))
    wait_until(lambda: engine.stats().queued == 1, "the second request never queued")


def _served_in_full(calls: Background, controls: Controls) -> None:
    controls.release()
    results = calls.join()
    assert results["running"] == 40 and results["queued"] == 5, results


def _bytes_input(name: str, value: str) -> triton.InferInput:
    tensor = triton.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
    return tensor


def _bool_input(name: str, value: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def _kserve_generate(target: str) -> Any:
    inputs = [
        _bytes_input("text_input", "hi"),
        _bytes_input("sampling_parameters", json.dumps({"max_tokens": 2})),
    ]
    with triton.InferenceServerClient(target) as kserve:
        return kserve.infer("tiny", inputs)


def test_a_full_queue_is_resource_exhausted_over_grpc(full: tuple[ServerThread, Controls]) -> None:
    server, controls = full
    calls = Background()
    try:
        _fill(server, controls, calls)
        with Client(server.target, retries=0, timeout=30) as c:
            with pytest.raises(Overloaded, match="queue full") as err:
                c.generate("hi", max_new_tokens=2)
            assert err.value.code == "RESOURCE_EXHAUSTED"
            with pytest.raises(Overloaded):
                list(c.stream("hi", max_new_tokens=2))
    finally:
        _served_in_full(calls, controls)


def test_a_full_score_queue_refuses_the_score_beyond_it(
    full: tuple[ServerThread, Controls],
) -> None:
    """The engine holds `max_queue` Score jobs while it is busy; one more is refused."""
    server, controls = full
    calls = Background()

    def score() -> Any:
        with Client(server.target, retries=0, timeout=60) as c:
            return c.score("the quick brown", [" fox", " dog"])

    try:
        _fill(server, controls, calls)
        for name in ("score-a", "score-b"):
            calls.run(name, score)
        # Neither can run while the engine is stopped: one is queued, the other refused.
        wait_until(
            lambda: any(
                isinstance(calls.results.get(n), Overloaded) for n in ("score-a", "score-b")
            ),
            "no Score was refused",
        )
    finally:
        _served_in_full(calls, controls)
    outcomes = sorted(type(calls.results[n]).__name__ for n in ("score-a", "score-b"))
    assert outcomes == ["Overloaded", "ScoreResult"], calls.results


def test_a_full_queue_is_resource_exhausted_over_kserve(
    full: tuple[ServerThread, Controls],
) -> None:
    server, controls = full
    calls = Background()
    try:
        _fill(server, controls, calls)
        with pytest.raises(InferenceServerException) as err:
            _kserve_generate(server.target)
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue full" in (err.value.message() or "")
    finally:
        _served_in_full(calls, controls)


def test_a_full_queue_is_429_with_retry_after(full: tuple[ServerThread, Controls]) -> None:
    server, controls = full
    calls = Background()
    try:
        _fill(server, controls, calls)
        with _oai(server) as client:
            with pytest.raises(openai.RateLimitError) as info:
                client.completions.create(model="tiny", prompt="hi", max_tokens=2)
            assert info.value.response.headers["retry-after"] == "1"
            assert isinstance(info.value.body, dict) and info.value.body["code"] == "queue_full"
            # A stream too: refused before it begins (a status, not an event mid-stream).
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True
                )
    finally:
        _served_in_full(calls, controls)


def _leaves_at_its_third_token(
    server: ServerThread, controls: Controls, begin: Callable[[], Callable[[], None]]
) -> None:
    """`begin` opens a 100-token stream, reads its first chunk and returns how to leave it;
    the client leaves while the engine is stopped at the stream's third token. The engine
    drops the request at its next step: CANCELLED, its slot free, a handful of tokens made."""
    engine = server.server.models.get("tiny").engine
    before = engine.stats()
    controls.pause_at_token(3)
    try:
        leave = begin()
        controls.wait_paused()
        assert engine.stats().running == 1
        leave()
        # The door has cancelled the request while the engine is stopped.
        wait_until(lambda: server.server.in_flight.count == 0, "the door kept the request")
    finally:
        controls.release()
    wait_until(lambda: engine.stats().running == 0, "the slot was never freed")
    after = engine.stats()
    assert after.finished.get("CANCELLED", 0) == before.finished.get("CANCELLED", 0) + 1
    assert after.free_slots == 1 and after.queued == 0
    assert after.generated_tokens - before.generated_tokens <= 4  # 100 were asked for


def test_a_client_that_leaves_frees_its_slot(full: tuple[ServerThread, Controls]) -> None:
    server, controls = full
    with _oai(server) as client:

        def begin() -> Callable[[], None]:
            # A chat stream's first chunk (the role) comes before any token. A completion's
            # first chunk comes with the first token whose text is not empty, and the tiny
            # model samples byte pieces: when its first two tokens had no text, the client
            # waited for a chunk the paused engine never made (its 60 s timeout: a flake).
            stream: Any = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=100,
                stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            next(iter(stream))
            return stream.close  # type: ignore[no-any-return]

        _leaves_at_its_third_token(server, controls, begin)


def test_a_cancelled_grpc_stream_frees_its_slot(full: tuple[ServerThread, Controls]) -> None:
    server, controls = full
    with Client(server.target, retries=0, timeout=60) as c:

        def begin() -> Callable[[], None]:
            stream = c.stream("hello", max_new_tokens=100, ignore_eos=True)
            next(stream)
            return stream.close  # cancels the RPC

        _leaves_at_its_third_token(server, controls, begin)


def test_a_cancelled_kserve_stream_frees_its_slot(full: tuple[ServerThread, Controls]) -> None:
    server, controls = full
    params = {"max_tokens": 100, "ignore_eos": True}
    inputs = [
        _bytes_input("text_input", "hello"),
        _bytes_input("sampling_parameters", json.dumps(params)),
        _bool_input("stream", True),
    ]
    with triton.InferenceServerClient(server.target) as kserve:
        answers: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def begin() -> Callable[[], None]:
            kserve.start_stream(callback=lambda result, error: answers.put((result, error)))
            kserve.async_stream_infer("tiny", inputs)
            # Its first deltas may be empty text, which the door does not send: the pause
            # the caller waits on says it is generating.
            return lambda: kserve.stop_stream(cancel_requests=True)

        _leaves_at_its_third_token(server, controls, begin)


def test_an_error_mid_stream_is_an_error_event(full: tuple[ServerThread, Controls]) -> None:
    """The engine runs out of memory at the stream's first decode step, after the 200 and
    its first token: the stream ends with an `{"error": ...}` event, which the SDK raises."""
    server, controls = full
    controls.oom_once("decode")
    with _oai(server) as client:
        stream: Any = client.completions.create(
            model="tiny", prompt="hello", max_tokens=8, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert stream.response.status_code == 200
        texts: list[str] = []
        with pytest.raises(openai.APIError, match="out of memory"):
            for chunk in stream:
                texts.extend(c.text for c in chunk.choices)
        assert controls.oom_fired("decode") and len(texts) <= 1
        # The engine serves on.
        done = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert done.usage is not None and done.usage.completion_tokens == 2


def test_a_body_over_the_limit_is_413(full: tuple[ServerThread, Controls]) -> None:
    server, _ = full
    with _oai(server) as client:
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="tiny", prompt="a" * (64 * 1024), max_tokens=1)
        assert info.value.status_code == 413
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "payload_too_large"
        done = client.completions.create(model="tiny", prompt="hi", max_tokens=1)
        assert done.usage is not None and done.usage.completion_tokens == 1


def test_a_drain_is_503_while_streams_in_flight_finish(tiny_registry: Path, tmp_path: Path) -> None:
    with steered_server(tiny_registry, tmp_path / "reg", **ONE_SLOT) as (server, controls):
        calls = Background()
        controls.pause_at_token(3)
        calls.run("stream", lambda: _stream_tokens(server.target, 60))
        controls.wait_paused()
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(60), server.loop)
        try:
            wait_until(lambda: server.server.in_flight.closing, "the drain never began")
            with _oai(server) as client, pytest.raises(openai.InternalServerError) as info:
                client.completions.create(model="tiny", prompt="hi", max_tokens=2)
            assert info.value.status_code == 503
            with Client(server.target, retries=0, timeout=30) as c, pytest.raises(Unavailable):
                c.generate("hi", max_new_tokens=2)
            assert not stopping.done()  # the drain waits for the stream in flight
        finally:
            controls.release()
        assert calls.join()["stream"] == 60  # it ran to its end
        stopping.result(60)
