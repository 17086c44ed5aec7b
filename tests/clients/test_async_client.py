"""AsyncClient offers what Client offers, against a real tiny grpc.aio server.

Each call is made through both clients and the answers compared, so a method that one of
them builds differently (a field left out, a default changed) fails here.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from slimserve.clients import (
    AsyncClient,
    ChatMessage,
    Client,
    ModelInfo,
    NotFound,
    StreamChunk,
    Unavailable,
)
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread, publish_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADMIN = "admin-token-0123456789abcdef"


def test_tokenize_and_model_info_match_the_blocking_client(tiny_server: ServerThread) -> None:
    chat = [ChatMessage("user", "hi there")]

    async def ask() -> tuple[list[int], list[int], ModelInfo, list[ModelInfo]]:
        async with AsyncClient(tiny_server.target, retries=0, timeout=30) as c:
            return (
                await c.tokenize("hello world", model="tiny"),
                await c.tokenize(chat),
                await c.model_info("tiny@1"),
                await c.models(),
            )

    text_ids, chat_ids, info, models = asyncio.run(ask())

    with Client(tiny_server.target, retries=0, timeout=30) as c:
        assert text_ids == c.tokenize("hello world", model="tiny") and text_ids
        assert chat_ids == c.tokenize(chat) and chat_ids
        assert info == c.model_info("tiny@1")
        assert models == c.models()
    assert info.ref == "tiny@1"


def _same_generation(a: Any, b: Any) -> None:
    """Two completions of one greedy request agree in everything but ids, timings and the
    prompt tokens the prefix cache supplied (the second may find the first's); the
    log-probabilities to float rounding (a reused prefix was computed in another pass)."""
    skip = {"request_id", "timings", "cached_tokens", "logprobs"}
    assert {k: v for k, v in asdict(a).items() if k not in skip} == {
        k: v for k, v in asdict(b).items() if k not in skip
    }
    assert len(a.logprobs) == len(b.logprobs)
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert x.token_id == y.token_id and [t[0] for t in x.top] == [t[0] for t in y.top]
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_generate_stream_and_score_match_the_blocking_client(tiny_server: ServerThread) -> None:
    # Greedy (the default sampling), so both clients' answers are the same tokens.
    options: dict[str, Any] = dict(
        max_new_tokens=6, ignore_eos=True, token_ids=True, logprobs=True, top_n=2, stop=["zzz"]
    )
    chat = [ChatMessage("user", "hi there")]
    labels = (" fox", " dog")

    async def ask() -> tuple[Any, Any, list[StreamChunk], Any]:
        async with AsyncClient(tiny_server.target, retries=0, timeout=30) as c:
            return (
                await c.generate("the quick brown", model="tiny", **options),
                await c.generate(chat, **options),
                [chunk async for chunk in c.stream("the quick brown", **options)],
                await c.score("the quick brown", labels, model="tiny@1"),
            )

    text, chatted, chunks, scored = asyncio.run(ask())

    with Client(tiny_server.target, retries=0, timeout=30) as c:
        _same_generation(text, c.generate("the quick brown", model="tiny", **options))
        _same_generation(chatted, c.generate(chat, **options))
        blocking = list(c.stream("the quick brown", **options))
        expected = c.score("the quick brown", labels, model="tiny@1")
    assert text.generated_tokens == 6 and len(text.token_ids) == 6
    assert len(text.logprobs) == 6 and all(len(t.top) == 2 for t in text.logprobs)
    assert [k.text for k in chunks] == [k.text for k in blocking]
    assert "".join(k.text for k in chunks) == text.text
    assert chunks[-1].stop_reason == blocking[-1].stop_reason == "MAX_TOKENS"
    assert scored.model == expected.model == "tiny@1"
    assert scored.scores == expected.scores and len(scored.scores) == 2


def test_model_info_of_an_unknown_model_is_not_found(tiny_server: ServerThread) -> None:
    async def ask() -> None:
        async with AsyncClient(tiny_server.target, retries=0, timeout=30) as c:
            await c.model_info("missing")

    with pytest.raises(NotFound):
        asyncio.run(ask())


def test_wait_ready_returns_on_a_serving_server_and_gives_up_on_none(
    tiny_server: ServerThread,
) -> None:
    async def wait(target: str, timeout: float) -> float:
        t0 = time.monotonic()
        async with AsyncClient(target, retries=0, timeout=5) as c:
            await c.wait_ready(timeout)
        return time.monotonic() - t0

    assert asyncio.run(wait(tiny_server.target, 30)) < 30
    with pytest.raises(Unavailable, match="not SERVING after 1s"):
        asyncio.run(wait(f"127.0.0.1:{_free_port()}", 1.0))


@pytest.fixture
def two_versions(tmp_path: Path) -> Iterator[ServerThread]:
    """A server of its own (calls here change what it serves): tiny@1 loaded, tiny@2 not;
    model control needs the admin token."""
    from slimserve.server.config import AuthConfig

    publish_tiny(tmp_path, "tiny", seed=0)
    publish_tiny(tmp_path, "tiny", seed=1)
    auth = AuthConfig(admin_tokens=frozenset({ADMIN}))
    server = ServerThread(replace(tiny_server_config(tmp_path), auth=auth)).start()
    yield server
    server.stop()


def test_load_and_unload_model(two_versions: ServerThread) -> None:
    async def swap() -> tuple[str, int]:
        async with AsyncClient(two_versions.target, retries=0, timeout=60, token=ADMIN) as c:
            loaded = await c.load_model("tiny@2")
            served = await c.model_info("tiny")
            await c.unload_model("tiny")
            with pytest.raises(NotFound):
                await c.model_info("tiny")
            return loaded.ref, served.version

    assert asyncio.run(swap()) == ("tiny@2", 2)


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_stream_is_retried_while_the_server_is_not_up_yet(tiny_registry: Path, kind: str) -> None:
    """The stream's first attempts find nothing listening (UNAVAILABLE, before any message);
    the retries reach the server once it has started on that port."""
    port = _free_port()
    server = ServerThread(replace(tiny_server_config(tiny_registry), port=port))
    failed: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:  # re-raised below, on the test's thread
            failed.append(exc)

    starter = threading.Timer(0.3, start)
    starter.start()
    try:
        # Backoff 0.1 s doubling: 9 retries wait up to ~51 s, room for gRPC's own reconnect
        # backoff and the model load.
        chunks = _stream(kind, f"127.0.0.1:{port}", retries=9)
    finally:
        starter.join()
        if failed:
            raise failed[0]
        server.stop()

    assert chunks[-1].is_last and chunks[-1].generated_tokens == 3
    assert chunks[0].model == "tiny@1"


def test_a_unary_call_is_retried_while_the_server_is_not_up_yet(tiny_registry: Path) -> None:
    """As the stream above, for Generate and Score through both clients at once (one server
    start): their first attempts find nothing listening, their retries reach the server."""
    port = _free_port()
    target = f"127.0.0.1:{port}"
    server = ServerThread(replace(tiny_server_config(tiny_registry), port=port))
    starter = threading.Timer(0.3, server.start)
    answers: dict[str, Any] = {}

    def blocking() -> None:
        with Client(target, retries=9, timeout=60) as c:
            answers["sync"] = c.generate("hello", max_new_tokens=3, ignore_eos=True)

    async def calls() -> tuple[Any, Any]:
        async with AsyncClient(target, retries=9, timeout=60) as c:
            return (
                await c.generate("hello", max_new_tokens=3, ignore_eos=True),
                await c.score("hello", [" a", " b"]),
            )

    sync = threading.Thread(target=blocking)
    starter.start()
    sync.start()
    try:
        generated, scored = asyncio.run(calls())
        sync.join(90)
    finally:
        starter.join()
        if server.server is not None:
            server.stop()
    assert generated.generated_tokens == 3 and generated.model == "tiny@1"
    assert answers["sync"].text == generated.text
    assert len(scored.scores) == 2


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_stream_with_no_retries_left_raises_unavailable(kind: str) -> None:
    with pytest.raises(Unavailable):
        _stream(kind, f"127.0.0.1:{_free_port()}", retries=0)


def _stream(kind: str, target: str, *, retries: int) -> list[StreamChunk]:
    options = {"max_new_tokens": 3, "ignore_eos": True}
    if kind == "sync":
        with Client(target, retries=retries, timeout=60) as c:
            return list(c.stream("hello", **options))

    async def run() -> list[StreamChunk]:
        async with AsyncClient(target, retries=retries, timeout=60) as c:
            return [chunk async for chunk in c.stream("hello", **options)]

    return asyncio.run(run())


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
