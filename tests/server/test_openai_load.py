"""The HTTP door under load and at shutdown: a full queue is 429, a drain is 503 while the
streams in flight finish, and a client that leaves frees its slot.

Generation is slowed by wrapping the real backend (`HookedServer`, each decode step still
the real forward pass), so a stream lasts long enough to be seen in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import tiny_server_config
from tests.server.test_lifecycle import LONG, HookedServer


def _wait(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture()
def slow(tiny_registry: Path) -> Iterator[HookedServer]:
    base = tiny_server_config(tiny_registry, max_queue=1, limits=LONG)
    one_slot = base.model.replace(max_batch=1)
    config = dataclasses.replace(base, model=one_slot, http_port=0)
    server = HookedServer(config, step_delay_s=0.03).start()
    yield server
    if server.server is not None and not server.server.in_flight.closing:
        server.stop()
    else:
        server.loop.call_soon_threadsafe(server.loop.stop)
        server.thread.join(10)


def _client(server: HookedServer) -> openai.OpenAI:
    url = f"http://127.0.0.1:{server.server.http.port}/v1"
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)


def _stream_in_background(client: openai.OpenAI, out: list[str]) -> threading.Thread:
    """A long stream on its own thread; `out` gets its text once it ends."""
    started = threading.Event()

    def run() -> None:
        stream = client.completions.create(
            model="tiny", prompt="hello", max_tokens=100, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        parts = []
        for chunk in stream:
            started.set()
            parts.extend(c.text for c in chunk.choices)
        out.append("".join(parts))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "the stream never began"
    return thread


def test_a_full_queue_is_429_with_retry_after(slow: HookedServer) -> None:
    engine = slow.server.models.get("tiny").engine
    with _client(slow) as client:
        done: list[str] = []
        first = _stream_in_background(client, done)
        queued = threading.Thread(
            target=lambda: done.append(
                client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text
            ),
            daemon=True,
        )
        queued.start()
        _wait(lambda: engine.stats().queued == 1, "the second request never queued")
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "queue_full"
        first.join(60)
        queued.join(60)
        assert len(done) == 2  # the two admitted requests were served in full


def test_a_drain_is_503_while_streams_in_flight_finish(slow: HookedServer) -> None:
    with _client(slow) as client:
        done: list[str] = []
        stream = _stream_in_background(client, done)
        stopping = asyncio.run_coroutine_threadsafe(slow.server.stop(30), slow.loop)
        _wait(lambda: slow.server.in_flight.closing, "the drain never began")
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert info.value.status_code == 503
        stream.join(60)
        stopping.result(60)
        assert done and len(done[0]) > 0  # the stream in flight ran to its end


def test_a_client_that_leaves_frees_its_slot(slow: HookedServer) -> None:
    engine = slow.server.models.get("tiny").engine
    with _client(slow) as client:
        stream: Any = client.completions.create(
            model="tiny", prompt="hello", max_tokens=100, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        next(iter(stream))
        assert engine.stats().running == 1
        stream.close()
        _wait(lambda: engine.stats().running == 0, "the slot was never freed", 5.0)
        assert engine.stats().generated_tokens < 100
