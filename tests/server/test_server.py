"""The service through a real grpc.aio server on loopback and the real client."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from slimserve.clients import (
    ChatMessage,
    Client,
    DataLoss,
    InvalidArgument,
    NotFound,
    Sampling,
)
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread, publish_tiny


@pytest.fixture()
def client(tiny_server: ServerThread) -> Any:
    with Client(tiny_server.target, timeout=60, retries=0) as c:
        yield c


def test_health_is_serving_only_after_load(tiny_registry: Path) -> None:
    server = ServerThread(tiny_server_config(tiny_registry))
    server.thread.start()
    from slimserve.server.app import build_server

    server.server, server.port = server.run(build_server(server.config, load=False))
    try:
        with Client(server.target, retries=0) as c:
            assert c.health() == "NOT_SERVING"
            assert c.health("slimserve.v1.GenerationService") == "NOT_SERVING"
            server.run(server.server.load_configured())
            assert c.health() == "SERVING"
            assert c.health("slimserve.v1.GenerationService") == "SERVING"
    finally:
        server.stop()


def test_stream_joins_to_unary_result(client: Client) -> None:
    opts = dict(max_new_tokens=24, ignore_eos=True, token_ids=True)
    unary = client.generate("café naïve", **opts)
    chunks = list(client.stream("café naïve", **opts))
    first, last = chunks[0], chunks[-1]
    assert first.model == "tiny@1" and len(first.model_digest) == 64
    assert first.input_tokens > 0 and first.text == ""
    assert last.is_last and last.stop_reason == "MAX_TOKENS"
    assert len(chunks) > 3  # streamed, not one blob
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert unary.generated_tokens == 24 and unary.model == "tiny@1"
    assert unary.timings.ttft_ms > 0 and unary.timings.total_ms >= unary.timings.ttft_ms


def test_chat_sampling_seed_and_logprobs(client: Client) -> None:
    chat = [ChatMessage("system", "be brief"), ChatMessage("user", "hello")]
    s = Sampling(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    a = client.generate(chat, sampling=s, max_new_tokens=12, logprobs=True, top_n=3)
    b = client.generate(chat, sampling=s, max_new_tokens=12, logprobs=True, top_n=3)
    assert a.text == b.text and a.token_ids == b.token_ids
    assert len(a.logprobs) == a.generated_tokens
    assert all(len(t.top) == 3 and t.logprob <= 0 for t in a.logprobs)


def test_score_and_tokenize(client: Client) -> None:
    r = client.score("the quick brown", [" fox", " dog"])
    assert [s.label for s in r.scores] == [" fox", " dog"]
    assert abs(sum(s.probability for s in r.scores) - 1) < 1e-6
    assert r.model == "tiny@1" and r.input_tokens > 0
    ids = client.tokenize("hello world")
    assert ids and all(isinstance(i, int) for i in ids)


def test_models_and_info(client: Client) -> None:
    (info,) = client.models()
    assert info.ref == "tiny@1" and info.is_default and info.state == "READY"
    assert info.backend and info.kv_bytes_per_sequence > 0 and info.max_batch == 4
    assert client.model_info("tiny@1").digest == info.digest


def _engine_of(server: ServerThread) -> Any:
    return server.server.models.get("tiny").engine


def test_cancelled_stream_stops_generation(tiny_server: ServerThread, client: Client) -> None:
    engine = _engine_of(tiny_server)
    before = engine.stats().finished.get("CANCELLED", 0)
    stream = client.stream("hello", max_new_tokens=64, ignore_eos=True)
    next(stream)
    next(stream)
    stream.close()  # cancels the RPC
    deadline = time.monotonic() + 20
    while engine.stats().finished.get("CANCELLED", 0) == before:
        assert time.monotonic() < deadline, "cancelled stream still running"
        time.sleep(0.01)
    stats = engine.stats()
    assert stats.running == 0 and stats.free_slots == 4


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (dict(max_new_tokens=10_000), "stopping.max_new_tokens"),
        (dict(sampling=Sampling(do_sample=True, temperature=-1.0)), "sampling.temperature"),
        (dict(sampling=Sampling(do_sample=True, top_p=1.5)), "sampling.top_p"),
        (dict(sampling=Sampling(do_sample=True, top_p=-0.1)), "sampling.top_p"),
        (dict(sampling=Sampling(temperature=float("nan"))), "sampling.temperature"),
        (dict(stop=[""]), "stopping.stop_sequences[0]"),
        (dict(top_n=99), "response.top_n"),
    ],
)
def test_bad_fields_are_invalid_argument_naming_the_field(
    client: Client, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.generate("hello", **options)
    assert err.value.field == field
    with pytest.raises(InvalidArgument):
        list(client.stream("hello", **options))


def test_bad_prompts(client: Client) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.generate("")
    assert err.value.field == "text"
    with pytest.raises(InvalidArgument, match="the limit is 127"):
        client.generate("hello " * 200)  # within the byte bound: refused once tokenized
    with pytest.raises(InvalidArgument) as err:
        client.generate([ChatMessage("wizard", "hi")])
    assert err.value.field == "chat.messages[0].role"
    with pytest.raises(InvalidArgument) as err:
        client.generate([])
    assert err.value.field == "chat.messages"
    with pytest.raises(InvalidArgument) as err:
        client.score("hello", [])
    assert err.value.field == "labels"


def test_unknown_model_version_alias_are_not_found(client: Client) -> None:
    with pytest.raises(NotFound, match="'nope' is not loaded"):
        client.generate("hello", model="nope")
    with pytest.raises(NotFound, match="version 9"):
        client.generate("hello", model="tiny@9")
    with pytest.raises(NotFound, match="no alias 'staging'"):
        client.generate("hello", model="tiny@staging")
    with pytest.raises(NotFound):
        client.score("hello", [" a"], model="nope")
    # And the server still serves.
    assert client.generate("hello", max_new_tokens=2, ignore_eos=True).generated_tokens == 2


def test_tampered_artifact_is_refused_at_load_naming_the_file(
    tiny_registry: Path, tmp_path: Path
) -> None:
    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    publish_tiny(root, "tiny", seed=5)  # tiny@2
    weights = root / "tiny" / "2" / "model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    server = ServerThread(
        tiny_server_config(root, models=("tiny@1",), allow_model_control=True)
    ).start()
    try:
        with Client(server.target, retries=0) as c:
            with pytest.raises(DataLoss, match=r"model\.safetensors fails its sha256"):
                c.load_model("tiny@2")
            # The old version keeps serving.
            assert c.model_info("tiny").ref == "tiny@1"
            assert c.generate("hello", max_new_tokens=2, ignore_eos=True).model == "tiny@1"
    finally:
        server.stop()


def test_load_model_swaps_version_and_alias_resolves(tiny_registry: Path, tmp_path: Path) -> None:
    from slimserve.registry.store import Registry

    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    publish_tiny(root, "tiny", seed=9)
    Registry(root).set_alias("tiny", "production", 2)
    server = ServerThread(
        tiny_server_config(root, models=("tiny@1",), allow_model_control=True)
    ).start()
    try:
        with Client(server.target, retries=0) as c:
            assert c.model_info().ref == "tiny@1"
            info = c.load_model("tiny@production")
            assert info.ref == "tiny@2" and "production" in info.aliases
            assert c.generate("hi", model="tiny@production", max_new_tokens=1).model == "tiny@2"
    finally:
        server.stop()


def test_reflection_lists_the_services(tiny_server: ServerThread) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert {
        "slimserve.v1.GenerationService",
        "slimserve.v1.ModelService",
        "grpc.health.v1.Health",
    } <= names
