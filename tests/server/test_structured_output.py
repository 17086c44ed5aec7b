"""Structured output on every door, fail-closed, through a real server and real clients:
the openai SDK (`response_format`, `chat.completions.parse` with a pydantic model, vLLM's
`guided_*` fields, the Responses API's `text.format`), slimserve's gRPC client and Triton's
client. Every finished output validates against its schema (checked with `jsonschema`), a
spec that cannot compile is a 400 / INVALID_ARGUMENT naming it, and an output cut by the
token budget says so. The tiny model is random: only the grammar makes its output valid."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import numpy as np
import openai
import pydantic
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from slimserve.clients import Client, InvalidArgument, Sampling, Structured
from slimserve.server.config import Limits
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread, openai_client

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "why": {"type": "string", "maxLength": 6},
    },
    "required": ["answer", "score", "ok", "tags", "why"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
USER = [{"role": "user", "content": "is this fraud?"}]


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no"]
    score: int = pydantic.Field(ge=0, le=5)


@pytest.fixture(scope="module", params=["plain", "ngram"])
def server(request: Any, tiny_registry: Path) -> Iterator[ServerThread]:
    """The tiny model, without and with a speculative drafter (drafts respect the grammar)."""
    draft = {"draft": "ngram", "draft_policy": "always"} if request.param == "ngram" else {}
    config = dataclasses.replace(
        tiny_server_config(
            tiny_registry, limits=Limits(max_new_tokens=200, default_max_new_tokens=120), **draft
        ),
        http_port=0,
    )
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.fixture()
def oai(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai_client(server, timeout=120) as client:
        yield client


def test_json_schema_outputs_validate_greedy_sampled_and_streamed(oai: openai.OpenAI) -> None:
    outputs = []
    for temperature, seed in ((0, None), (1.0, 1), (1.0, 2), (1.3, 3)):
        done = oai.chat.completions.create(
            model="tiny",
            messages=USER,
            response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
            temperature=temperature,
            seed=seed,
            max_tokens=120,
        )
        assert done.choices[0].finish_reason == "stop"
        outputs.append(done.choices[0].message.content or "")
    completion = oai.completions.create(
        model="tiny",
        prompt="verdict:",
        max_tokens=120,
        temperature=0,
        extra_body={"response_format": RESPONSE_FORMAT},
    )
    outputs.append(completion.choices[0].text)
    streamed = oai.chat.completions.create(
        model="tiny",
        messages=USER,
        response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=120,
        stream=True,
    )
    outputs.append("".join(c.choices[0].delta.content or "" for c in streamed if c.choices))
    for text in outputs:
        jsonschema.validate(json.loads(text), SCHEMA)
    # additionalProperties is closed by default (strict): exactly the listed keys.
    assert all(set(json.loads(t)) == set(SCHEMA["properties"]) for t in outputs)  # type: ignore[arg-type]


def test_the_sdk_parses_into_a_pydantic_model(oai: openai.OpenAI) -> None:
    parsed = oai.chat.completions.parse(
        model="tiny", messages=USER, response_format=Verdict, max_tokens=60, temperature=0
    )
    verdict = parsed.choices[0].message.parsed
    assert isinstance(verdict, Verdict) and 0 <= verdict.score <= 5


def test_json_object_choice_regex_and_grammar(oai: openai.OpenAI) -> None:
    obj = oai.chat.completions.create(
        model="tiny",
        messages=USER,
        response_format={"type": "json_object"},
        max_tokens=150,
        temperature=0,
    )
    if obj.choices[0].finish_reason == "stop":  # a free object may go on past the budget
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    choice = oai.completions.create(
        model="tiny",
        prompt="pick:",
        max_tokens=10,
        temperature=1.0,
        seed=4,
        extra_body={"guided_choice": ["approve", "decline", "review"]},
    )
    assert choice.choices[0].text in ("approve", "decline", "review")
    regex = oai.completions.create(
        model="tiny",
        prompt="code:",
        max_tokens=20,
        temperature=1.0,
        seed=5,
        extra_body={"guided_regex": "[A-F][0-9]{3}-(ok|no)"},
    )
    assert re.fullmatch("[A-F][0-9]{3}-(ok|no)", regex.choices[0].text)
    grammar = oai.completions.create(
        model="tiny",
        prompt="say:",
        max_tokens=20,
        temperature=0,
        extra_body={"guided_grammar": 'root ::= "risk=" ("low" | "high")'},
    )
    assert grammar.choices[0].text in ("risk=low", "risk=high")


def test_specs_that_cannot_compile_are_400_naming_the_field(oai: openai.OpenAI) -> None:
    def schema(body: dict[str, Any]) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": body}}

    bad: list[tuple[dict[str, Any], str]] = [
        ({"response_format": schema({"type": "strng"})}, "response_format"),
        # A keyword the grammar cannot enforce is refused, never dropped.
        ({"response_format": schema({"type": "array", "uniqueItems": True})}, "response_format"),
        ({"guided_regex": "(ab"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ]
    for extra, param in bad:
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model="tiny", messages=USER, extra_body=extra)
        body = err.value.body
        assert isinstance(body, dict) and body.get("param") == param, (extra, body)


def test_a_cut_output_says_length(oai: openai.OpenAI) -> None:
    cut = oai.chat.completions.create(
        model="tiny", messages=USER, response_format=RESPONSE_FORMAT, max_tokens=3, temperature=0
    )  # type: ignore[call-overload]
    assert cut.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(cut.choices[0].message.content or "")


def test_the_responses_api_holds_text_format(oai: openai.OpenAI) -> None:
    done = oai.responses.create(
        model="tiny",
        input="is this fraud?",
        text={"format": {"type": "json_schema", "name": "verdict", "schema": SCHEMA}},
        max_output_tokens=120,
        temperature=0,
    )
    assert done.status == "completed"
    jsonschema.validate(json.loads(done.output_text), SCHEMA)


def test_grpc_and_kserve_hold_the_same_schema(server: ServerThread) -> None:
    with Client(server.target, retries=0, timeout=120) as c:
        greedy = c.generate(
            "verdict:", max_new_tokens=120, structured=Structured(json_schema=SCHEMA)
        )
        assert greedy.stop_reason == "EOS_TOKEN"
        jsonschema.validate(json.loads(greedy.text), SCHEMA)
        sampled = c.generate(
            "verdict:",
            max_new_tokens=120,
            sampling=Sampling(do_sample=True, temperature=1.0, seed=9),
            structured=Structured(json_schema=SCHEMA),
        )
        jsonschema.validate(json.loads(sampled.text), SCHEMA)
        streamed = "".join(
            ch.text
            for ch in c.stream(
                "verdict:", max_new_tokens=120, structured=Structured(json_schema=SCHEMA)
            )
        )
        assert streamed == greedy.text
        with pytest.raises(InvalidArgument) as err:
            c.generate("x", structured=Structured(regex="(ab"))
        assert err.value.field == "guided"
    kserve = triton.InferenceServerClient(server.target)
    try:
        prompt = triton.InferInput("text_input", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"verdict:"], dtype=np.object_))
        params = triton.InferInput("sampling_parameters", [1], "BYTES")
        settings = {"temperature": 0, "max_tokens": 120, "guided_json": SCHEMA}
        params.set_data_from_numpy(np.array([json.dumps(settings).encode()], dtype=np.object_))
        out = kserve.infer("tiny", [prompt, params])
        text = "".join(v.decode() for v in out.as_numpy("text_output"))
        assert text.startswith("verdict:")
        assert json.loads(text.removeprefix("verdict:")) == json.loads(greedy.text)
        settings = {"guided_regex": "(ab"}
        params.set_data_from_numpy(np.array([json.dumps(settings).encode()], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="guided"):
            kserve.infer("tiny", [prompt, params])
    finally:
        kserve.close()
