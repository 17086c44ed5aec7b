"""A caller that gives up on a Score (deadline, disconnect, a KServe stream that ends) costs
the model nothing afterwards: the engine process drops the job at its next chunk, the
server's pipe reader survives the late answer, and the next request is served at once.

Through the engine process as deployed, with a backend whose Score chunks are slow and
logged (`tests.engine.faults:slow_scores`)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from slimserve.clients import Client, DeadlineExceeded
from slimserve.server.config import Limits
from slimserve.v1 import generation_pb2 as gen_pb
from slimserve.v1 import generation_pb2_grpc as gen_grpc
from tests.conftest import tiny_server_config
from tests.engine.faults import score_log
from tests.helpers import ServerThread

PROMPT = "the quick brown fox jumps over the lazy dog, again and again"
#: One chunk each (score_step_tokens is below one label's cost): 24 x 0.25 s of Score work.
LABELS = [f" label{i}" for i in range(24)]


@pytest.fixture(scope="module")
def slow_server(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("abandoned") / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    config = tiny_server_config(
        root,
        backend_plugins=("tests.engine.faults:slow_scores",),
        dtype="float32",
        score_step_tokens=8,
        limits=Limits(max_new_tokens=64, default_max_new_tokens=16),
    )
    server = ServerThread(config).start()
    server.registry_root = root
    yield server
    server.stop()


def _chunks(server: Any) -> int:
    log = score_log(server.registry_root)
    return len(log.read_text().splitlines()) if log.exists() else 0


def _settles(count: Callable[[], int], quiet_s: float = 1.0, timeout: float = 30.0) -> int:
    """`count()` once it has not changed for `quiet_s` (the engine has stopped the job)."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "the engine kept scoring an abandoned job"
        time.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
    return last


def _still_serving(client: Client) -> None:
    """A short generation answers well inside its deadline, and health says SERVING."""
    assert client.health() == "SERVING"
    for _ in range(3):
        done = client.generate("hello", max_new_tokens=4, ignore_eos=True, timeout=10)
        assert done.generated_tokens == 4


def test_a_score_past_its_deadline_does_not_wedge_the_model(slow_server: Any) -> None:
    with Client(slow_server.target, retries=0, timeout=30) as c:
        assert c.model_info().plan.startswith("tests.engine.faults:slow_scores")
        for _ in range(2):
            before = _chunks(slow_server)
            with pytest.raises(DeadlineExceeded):
                c.score(PROMPT, LABELS, timeout=0.6)
            ran = _settles(lambda: _chunks(slow_server)) - before
            assert 1 <= ran < len(LABELS) // 2, ran
            _still_serving(c)  # the late answer of the expired job was dropped, not fatal
        # A Score that the caller waits for still answers every label.
        assert len(c.score(PROMPT, LABELS[:3]).scores) == 3


def test_a_disconnected_score_leaves_the_engine_at_the_next_chunk(slow_server: Any) -> None:
    """No deadline at all: only the cancel from the server tells the engine to stop."""
    before = _chunks(slow_server)
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        call = stub.Score.future(gen_pb.ScoreRequest(text=PROMPT, labels=LABELS))
        deadline = time.monotonic() + 30
        while _chunks(slow_server) == before:  # the job is running in the engine
            assert time.monotonic() < deadline
            time.sleep(0.02)
        call.cancel()
    ran = _settles(lambda: _chunks(slow_server)) - before
    assert ran < len(LABELS) // 2, f"{ran} of {len(LABELS)} chunks ran after the disconnect"
    with Client(slow_server.target, retries=0, timeout=30) as c:
        _still_serving(c)


def test_a_kserve_stream_that_ends_cancels_its_scores(slow_server: Any) -> None:
    before = _chunks(slow_server)
    kserve = triton.InferenceServerClient(slow_server.target)
    kserve.start_stream(callback=lambda result, error: None)
    try:
        prompt = triton.InferInput("text_input", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
        labels = triton.InferInput("labels", [len(LABELS)], "BYTES")
        labels.set_data_from_numpy(np.array([s.encode() for s in LABELS], dtype=np.object_))
        kserve.async_stream_infer("tiny", [prompt, labels])
        deadline = time.monotonic() + 30
        while _chunks(slow_server) == before:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        kserve.stop_stream(cancel_requests=True)
        kserve.close()
    ran = _settles(lambda: _chunks(slow_server)) - before
    assert ran < len(LABELS) // 2, f"{ran} of {len(LABELS)} chunks ran after the stream ended"
    with Client(slow_server.target, retries=0, timeout=30) as c:
        _still_serving(c)
