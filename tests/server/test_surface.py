"""The OpenAI surface users expect and several versions of one name, through a real server:
`n` completions, `/v1/responses` (plain and streamed, with the SDK's own event parser), an
explicit 400 for every field the server does not honour, and a parent and its child served
side by side by `name@version` on every door."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import tritonclient.grpc as triton

from slimserve.clients import Client, NotFound
from slimserve.server.config import Limits
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread, openai_client, publish_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def two_versions(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("versions") / "reg"
    shutil.copytree(tiny_registry, root, symlinks=True)
    publish_tiny(root, "tiny", seed=7)  # tiny@2: other weights, the same tokenizer
    return root


@pytest.fixture(scope="module")
def server(two_versions: Path) -> Iterator[ServerThread]:
    config = dataclasses.replace(
        tiny_server_config(
            two_versions,
            models=("tiny@1", "tiny@2"),
            limits=Limits(max_new_tokens=64, default_max_new_tokens=16),
        ),
        http_port=0,
        allow_model_control=True,
    )
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.fixture()
def oai(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai_client(server) as client:
        yield client


GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


def test_n_completions_each_with_its_index(oai: openai.OpenAI) -> None:
    sampled = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello there"}],
        n=3,
        temperature=1.0,
        seed=11,
        max_tokens=12,
    )
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) > 1, "n samples with one seed each came out identical"
    again = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello there"}],
        n=3,
        temperature=1.0,
        seed=11,
        max_tokens=12,
    )
    assert [c.message.content for c in again.choices] == texts  # seeded: reproducible
    assert sampled.usage is not None and 3 <= sampled.usage.completion_tokens <= 36
    greedy = oai.completions.create(model="tiny", prompt=["one", "two"], n=2, **GREEDY)
    assert [c.index for c in greedy.choices] == [0, 1, 2, 3]
    assert greedy.choices[0].text == greedy.choices[1].text  # greedy: the same twice
    chunks = list(
        oai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, stream=True, **GREEDY
        )
    )
    by_index: dict[int, str] = {}
    finished = set()
    for chunk in chunks:
        for c in chunk.choices:
            by_index[c.index] = by_index.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and by_index[0] == by_index[1] != ""


def test_responses_plain_streamed_and_cut(oai: openai.OpenAI) -> None:
    plain = oai.responses.create(
        model="tiny",
        input="say something",
        instructions="be brief",
        max_output_tokens=10,
        temperature=0,
    )
    assert plain.object == "response" and plain.output_text
    assert plain.usage is not None and plain.usage.output_tokens == 10
    assert plain.status == "incomplete"  # the token budget cut it
    assert plain.incomplete_details is not None
    assert plain.incomplete_details.reason == "max_output_tokens"
    chat = oai.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say something"},
        ],
        max_tokens=10,
        temperature=0,
    )
    assert plain.output_text == chat.choices[0].message.content  # one request path
    events = list(
        oai.responses.create(
            model="tiny",
            input=[{"role": "user", "content": "say something"}],
            instructions="be brief",
            max_output_tokens=10,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_every_field_not_honoured_is_refused_by_name(oai: openai.OpenAI) -> None:
    cases = [
        (
            lambda: oai.completions.create(model="tiny", prompt="x", extra_body={"min_p": 0.1}),
            "min_p",
        ),
        (
            lambda: oai.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "x"}],
                tools=[{"type": "function", "function": {"name": "f"}}],
            ),
            "tools",
        ),
        (
            lambda: oai.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], presence_penalty=0.5
            ),
            "presence_penalty",
        ),
        (
            lambda: oai.responses.create(model="tiny", input="x", previous_response_id="resp_1"),
            "previous_response_id",
        ),
        (lambda: oai.responses.create(model="tiny", input="x", store=True), "store"),
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            call()
        body = err.value.body
        assert isinstance(body, dict) and body.get("param") == param, (param, body)


def test_two_versions_side_by_side_on_every_door(server: ServerThread, oai: openai.OpenAI) -> None:
    with Client(server.target, retries=0, timeout=60) as c:
        one = c.generate("the quick", model="tiny@1", max_new_tokens=8, ignore_eos=True)
        two = c.generate("the quick", model="tiny@2", max_new_tokens=8, ignore_eos=True)
        bare = c.generate("the quick", model="tiny", max_new_tokens=8, ignore_eos=True)
        assert (one.model, two.model, bare.model) == ("tiny@1", "tiny@2", "tiny@1")
        assert bare.text == one.text
        score_one = c.score("the quick", [" a", " b"], model="tiny@1")
        score_two = c.score("the quick", [" a", " b"], model="tiny@2")
        assert score_two.model == "tiny@2"
        # Other weights answer: the two versions' scores differ.
        assert score_one.scores[0].logprob != pytest.approx(score_two.scores[0].logprob)
        assert {m.ref for m in c.models()} >= {"tiny@1", "tiny@2"}
    http = oai.completions.create(model="tiny@2", prompt="the quick", **GREEDY)
    assert http.model == "tiny@2"
    ids = {m.id for m in oai.models.list().data}
    assert {"tiny", "tiny@2"} <= ids
    kserve = triton.InferenceServerClient(server.target)
    try:
        meta = kserve.get_model_metadata("tiny", as_json=True)
        assert sorted(meta["versions"]) == ["1", "2"]
        prompt = triton.InferInput("text_input", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"the quick"], dtype=np.object_))
        params = triton.InferInput("sampling_parameters", [1], "BYTES")
        settings = json.dumps({"temperature": 0, "max_tokens": 8, "ignore_eos": True})
        params.set_data_from_numpy(np.array([settings.encode()], dtype=np.object_))
        answer = kserve.infer("tiny", [prompt, params], model_version="2")
        assert answer.get_response().model_version == "2"
    finally:
        kserve.close()
    with Client(server.target, retries=0, timeout=60) as c:
        c.unload_model("tiny@2")
        with pytest.raises(NotFound, match="version 2 is not loaded"):
            c.generate("hi", model="tiny@2", max_new_tokens=2)
        assert c.generate("hi", model="tiny", max_new_tokens=2).model == "tiny@1"
        c.load_model("tiny@2", beside=True)  # back beside it: the bare name stays on 1
        assert c.generate("hi", model="tiny", max_new_tokens=2).model == "tiny@1"
        assert c.generate("hi", model="tiny@2", max_new_tokens=2).model == "tiny@2"
