"""Careless and hostile clients against a real server, through the engine process: the
server keeps serving, health tells the truth and the right status comes back."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from slimserve.clients import ChatMessage, Client, InvalidArgument
from slimserve.server.config import Limits
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread

#: ~3.9 MB: under the 4 MiB message limit, far over what the prompt limit can hold.
HUGE = "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 68_000


@pytest.fixture(scope="module")
def server(tiny_registry: Path) -> Iterator[ServerThread]:
    """The tiny model, each decode step 20 ms slower (a stream to watch), both doors."""
    config = dataclasses.replace(
        tiny_server_config(
            tiny_registry,
            backend_plugins=("tests.engine.faults:slow_decode",),
            dtype="float32",
            limits=Limits(max_new_tokens=200, default_max_new_tokens=16),
        ),
        http_port=0,
    )
    server = ServerThread(config).start()
    yield server
    server.stop()


class _Watched:
    """A stream read on a thread: the gaps between its chunks."""

    def __init__(self, client: Client) -> None:
        self.gaps: list[float] = []
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, args=(client,))
        self.thread.start()
        assert self.started.wait(60), "the stream never started"

    def _read(self, client: Client) -> None:
        last = 0.0
        try:
            for _ in client.stream("hello", max_new_tokens=150, ignore_eos=True, timeout=120):
                now = time.monotonic()
                if last:
                    self.gaps.append(now - last)
                last = now
                self.started.set()
        except BaseException as exc:
            self.error = exc
            self.started.set()

    def join(self) -> None:
        self.thread.join(120)
        assert self.error is None, self.error


def test_an_oversized_prompt_is_refused_unread_while_streams_go_on(server: ServerThread) -> None:
    """3.9 MB of text took ~4 s to tokenize before its length was checked, holding the
    GIL: health and every stream froze meanwhile, and memory grew by GBs."""
    me = psutil.Process()
    oai = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.server.http.port}/v1",
        api_key="-",
        max_retries=0,
        timeout=60,
    )
    with Client(server.target, retries=0, timeout=60) as c:
        c.generate("warm", max_new_tokens=2)
        idle = me.memory_info().rss
        stream = _Watched(c)
        refusals, health = [], []
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(InvalidArgument, match=r"text.*bytes"):
                c.generate(HUGE, max_new_tokens=4)
            refusals.append(time.monotonic() - t0)
            t0 = time.monotonic()
            with pytest.raises(InvalidArgument, match=r"chat.*bytes"):
                c.generate([ChatMessage("user", HUGE)], max_new_tokens=4)
            refusals.append(time.monotonic() - t0)
            t0 = time.monotonic()
            with pytest.raises(openai.BadRequestError, match="bytes"):
                oai.completions.create(model="tiny", prompt=HUGE, max_tokens=4)
            refusals.append(time.monotonic() - t0)
            t0 = time.monotonic()
            assert c.health() == "SERVING"
            health.append(time.monotonic() - t0)
        stream.join()
        grown = me.memory_info().rss - idle
    oai.close()
    # Each refusal is the byte count and a message's transfer, not seconds of tokenizing;
    # the bounds leave a loaded machine room, and sit far below what tokenizing took.
    assert max(refusals) < 1.5, refusals
    assert max(health) < 1.0, health
    assert max(stream.gaps) < 1.0, max(stream.gaps)
    assert grown < 300 * 2**20, f"memory grew by {grown / 2**20:.0f} MB"


def test_a_kserve_stream_that_sends_faster_than_it_is_answered_is_held_back(
    server: ServerThread,
) -> None:
    """20 MB of slow requests on one ModelStreamInfer: at most a stream's bound of them is
    in the engine at once (the rest wait unread in gRPC's flow control), health answers
    meanwhile, and memory stays near idle."""
    import numpy as np
    import tritonclient.grpc as triton

    from slimserve.server.kserve.servicer import MAX_IN_FLIGHT_PER_STREAM

    engine = server.server.models.get("tiny").engine
    me = psutil.Process()
    # Valid JSON made large with whitespace: each request is ~200 KB on the wire.
    settings = '{"max_tokens": 150, "ignore_eos": true, "temperature": 0' + " " * 200_000 + "}"

    def request() -> list[Any]:
        prompt = triton.InferInput("text_input", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
        params = triton.InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([settings.encode()], dtype=np.object_))
        return [prompt, params]

    with Client(server.target, retries=0, timeout=60) as c:
        c.generate("warm", max_new_tokens=2)
        idle = me.memory_info().rss
        kserve = triton.InferenceServerClient(server.target)
        kserve.start_stream(callback=lambda result, error: None)
        in_engine, health = [], []
        try:
            for _ in range(100):
                kserve.async_stream_infer("tiny", request())
            for _ in range(40):
                stats = engine.stats()
                in_engine.append(stats.running + stats.queued)
                t0 = time.monotonic()
                assert c.health() == "SERVING"
                health.append(time.monotonic() - t0)
                time.sleep(0.05)
            grown = me.memory_info().rss - idle
        finally:
            kserve.stop_stream(cancel_requests=True)
            kserve.close()
        deadline = time.monotonic() + 60
        while engine.stats().running + engine.stats().queued:
            assert time.monotonic() < deadline, "the cancelled stream's requests stayed"
            time.sleep(0.1)
        assert c.generate("hello", max_new_tokens=3, ignore_eos=True).generated_tokens == 3
    assert 1 <= max(in_engine) <= MAX_IN_FLIGHT_PER_STREAM, in_engine
    assert max(health) < 1.0, health
    assert grown < 300 * 2**20, f"memory grew by {grown / 2**20:.0f} MB"
