"""Careless and hostile clients against a real server, through the engine process: the
server keeps serving, health tells the truth and the right status comes back."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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
