"""The OpenAI-compatible HTTP door, through a real server and the real `openai` SDK.

One server with a bearer token serves both doors; every answer is held against the gRPC
door's (`Generate`, `Score`) for the same request, and every error against its status.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from slimserve.clients import ChatMessage, Client
from slimserve.server.config import AuthConfig
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread

TOKEN = "user-token-0123456789abcdef"
#: Echo scoring of a T-token prompt costs T(T-1)/2: 20 tokens fit (190), 30 do not (435).
MAX_SCORE_TOKENS = 20


@pytest.fixture(scope="module")
def door(tiny_registry: Path) -> Iterator[ServerThread]:
    config = dataclasses.replace(
        tiny_server_config(tiny_registry, max_score_tokens=MAX_SCORE_TOKENS, restart_backoff_s=1.0),
        http_port=0,
        metrics_port=0,
        auth=AuthConfig(tokens=frozenset({TOKEN}), labels={TOKEN: "alice"}),
    )
    server = ServerThread(config).start()
    yield server
    server.stop()


def base_url(server: ServerThread) -> str:
    return f"http://127.0.0.1:{server.server.http.port}"


@pytest.fixture()
def oai(door: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{base_url(door)}/v1", api_key=TOKEN, max_retries=0, timeout=60
    ) as client:
        yield client


@pytest.fixture()
def grpc_client(door: ServerThread) -> Iterator[Client]:
    with Client(door.target, retries=0, timeout=60, token=TOKEN) as c:
        yield c


def raw(
    server: ServerThread,
    path: str,
    body: Any = None,
    token: str | None = TOKEN,
    data: bytes | None = None,
) -> Any:
    """(status, headers, body text) of one request, without the SDK; `data` is sent as it is."""
    if data is None and body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(
        base_url(server) + path, data=data, method="POST" if data else "GET"
    )
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


# -- answers equal the gRPC door's ---------------------------------------------------


def test_completion_text_equals_grpc_generate(
    door: ServerThread, oai: openai.OpenAI, grpc_client: Client
) -> None:
    grpc = grpc_client.generate("hello world", max_new_tokens=12, ignore_eos=True)
    resp = oai.completions.with_raw_response.create(
        model="tiny",
        prompt="hello world",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
        extra_headers={"x-request-id": "req-completion-1"},
    )
    done = resp.parse()
    assert done.choices[0].text == grpc.text
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (grpc.input_tokens, 12)
    assert done.model == "tiny@1"
    assert resp.headers["x-slimserve-model"] == "tiny@1"
    assert resp.headers["x-slimserve-model-digest"] == grpc.model_digest
    assert resp.headers["x-request-id"] == "req-completion-1"
    assert done.id == "cmpl-req-completion-1"


def test_chat_text_equals_grpc_chat(oai: openai.OpenAI, grpc_client: Client) -> None:
    messages = [ChatMessage("system", "be brief"), ChatMessage("user", "café naïve")]
    grpc = grpc_client.generate(messages, max_new_tokens=10, ignore_eos=True)
    done = oai.chat.completions.create(
        model="tiny@1",
        messages=[{"role": m.role, "content": m.content} for m in messages],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert done.choices[0].message.content == grpc.text
    assert done.choices[0].message.role == "assistant"
    assert done.usage is not None and done.usage.prompt_tokens == grpc.input_tokens


def test_streams_join_to_their_unary_text(oai: openai.OpenAI) -> None:
    common: dict[str, Any] = dict(max_tokens=14, temperature=0, extra_body={"ignore_eos": True})
    unary = oai.completions.create(model="tiny", prompt="日本語 🙂", **common)
    chunks = list(
        oai.completions.create(
            model="tiny",
            prompt="日本語 🙂",
            stream=True,
            stream_options={"include_usage": True},
            **common,
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == unary.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 14
    assert not chunks[-1].choices

    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "hello again"}]}]
    chat = oai.chat.completions.create(model="tiny", messages=messages, **common)
    parts = list(
        oai.chat.completions.create(model="tiny", messages=messages, stream=True, **common)
    )
    assert parts[0].choices[0].delta.role == "assistant"
    joined = "".join(p.choices[0].delta.content or "" for p in parts)
    assert joined == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"


def test_a_stream_is_server_sent_events_ending_in_done(door: ServerThread) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "stream": True}
    status, headers, text = raw(door, "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert headers["x-slimserve-model"] == "tiny@1" and len(headers["x-request-id"]) == 32


def test_stop_sequences_and_sampling_fields(oai: openai.OpenAI, grpc_client: Client) -> None:
    grpc = grpc_client.generate("hello world", max_new_tokens=20, ignore_eos=True)
    stop = grpc.text[3:5]
    done = oai.completions.create(
        model="tiny", prompt="hello world", max_tokens=20, temperature=0, stop=[stop]
    )
    assert done.choices[0].finish_reason == "stop"
    assert stop not in done.choices[0].text and grpc.text.startswith(done.choices[0].text)
    seeded = [
        oai.completions.create(
            model="tiny", prompt="hello", max_tokens=8, temperature=0.9, top_p=0.9, seed=7,
            extra_body={"top_k": 20, "ignore_eos": True},
        ).choices[0].text
        for _ in range(2)
    ]  # fmt: skip
    assert seeded[0] == seeded[1]


def test_generated_logprobs(oai: openai.OpenAI, grpc_client: Client) -> None:
    grpc = grpc_client.generate("hello", max_new_tokens=4, ignore_eos=True, logprobs=True, top_n=2)
    done = oai.completions.create(
        model="tiny", prompt="hello", max_tokens=4, temperature=0, logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lps = done.choices[0].logprobs
    assert lps is not None and lps.token_logprobs is not None and lps.top_logprobs is not None
    assert lps.token_logprobs == pytest.approx([t.logprob for t in grpc.logprobs], abs=1e-5)
    assert all(len(top) == 2 for top in lps.top_logprobs)
    chat = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = chat.choices[0].logprobs
    assert content is not None and content.content is not None and len(content.content) == 3
    assert all(len(t.top_logprobs) == 3 for t in content.content)
    assert "".join(t.token for t in content.content) == chat.choices[0].message.content


# -- echo: the prompt's log-probabilities, as gRPC Score gives them ------------------


def test_echo_logprobs_equal_grpc_score(oai: openai.OpenAI, grpc_client: Client) -> None:
    prefix, label = "the quick brown", " fox jumps"
    score = grpc_client.score(prefix, [label]).scores[0]
    done = oai.completions.create(
        model="tiny", prompt=prefix + label, max_tokens=0, echo=True, logprobs=1
    )
    choice = done.choices[0]
    lps = choice.logprobs
    assert lps is not None and lps.tokens is not None and lps.token_logprobs is not None
    assert choice.text == prefix + label and "".join(lps.tokens) == prefix + label
    assert lps.token_logprobs[0] is None  # the first token has no context
    tail = lps.token_logprobs[-score.num_tokens :]
    assert sum(tail) == pytest.approx(score.logprob, abs=1e-4)
    # Each token alone, too: its log-probability after the text before it.
    for k in (1, 3):
        before, token = "".join(lps.tokens[:k]), lps.tokens[k]
        alone = grpc_client.score(before, [token]).scores[0]
        assert alone.num_tokens == 1
        assert lps.token_logprobs[k] == pytest.approx(alone.logprob, abs=1e-4)
    assert done.usage is not None and done.usage.completion_tokens == 0


def test_echo_top_logprobs_read_as_lm_eval_reads_them(oai: openai.OpenAI) -> None:
    # lm-eval's loglikelihood request: echo the context + continuation, max_tokens 0,
    # logprobs k; it sums the continuation's token_logprobs and calls it greedy when each
    # continuation token is the best of its position's top_logprobs.
    context, continuation = "the quick brown", " fox"
    done = oai.completions.create(
        model="tiny", prompt=context + continuation, max_tokens=0, echo=True, logprobs=3
    )
    lps = done.choices[0].logprobs
    assert lps is not None and lps.token_logprobs and lps.top_logprobs and lps.tokens
    assert lps.top_logprobs[0] is None  # the first token has no context
    rows = zip(lps.tokens[1:], lps.token_logprobs[1:], lps.top_logprobs[1:], strict=True)
    for token, lp, top in rows:
        assert top is not None and len(top) == 3 and lp is not None
        best = max(top.values())
        assert lp <= best + 1e-6  # nothing beats the position's best
        if token in top:  # the same figure both ways
            assert top[token] == pytest.approx(lp, abs=1e-4)
        if lp >= best - 1e-6:  # the token is the greedy pick: it must be listed as the best
            assert token in top and top[token] == pytest.approx(best, abs=1e-4)


def test_echo_with_generation_and_in_a_stream(oai: openai.OpenAI) -> None:
    prompt = "hello world, hello"
    done = oai.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    plain = oai.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = done.choices[0]
    assert choice.text == prompt + plain.choices[0].text
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    assert done.usage is not None
    assert len(choice.logprobs.token_logprobs) == done.usage.prompt_tokens + 3
    chunks = list(
        oai.completions.create(
            model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == choice.text


def test_batched_and_token_id_prompts(oai: openai.OpenAI, grpc_client: Client) -> None:
    ids = grpc_client.tokenize("hello world")
    done = oai.completions.create(
        model="tiny", prompt=["hello world", list(ids)], max_tokens=5, temperature=0
    )
    texts = [c.text for c in sorted(done.choices, key=lambda c: c.index)]
    assert texts[0] == texts[1] and [c.index for c in done.choices] == [0, 1]


# -- models, health, errors ----------------------------------------------------------


def test_models_and_health(door: ServerThread, oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert oai.models.retrieve("tiny@1").id == "tiny"
    assert raw(door, "/health/live", token=None)[0] == 200
    status, _, text = raw(door, "/health/ready", token=None)
    assert (status, json.loads(text)["status"]) == (200, "SERVING")


def _error(call: Callable[[], Any], kind: type[openai.APIStatusError]) -> dict[str, Any]:
    with pytest.raises(kind) as info:
        call()
    body = info.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    return body


def test_bad_fields_are_400_naming_the_field(oai: openai.OpenAI) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"stop": [""]}, "stop[0]"),
        ({"logprobs": 99}, "logprobs"),
        ({"n": 99}, "n"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [[1, 2, 10**6]]}, "prompt[2]"),
        ({"model": "not a name!"}, "model"),
    ]
    for fields, param in bad:
        request = {"model": "tiny", "prompt": "hello", "max_tokens": 4, **fields}
        body = _error(lambda r=request: oai.completions.create(**r), openai.BadRequestError)
        assert body["param"] == param, (fields, body)
        assert body["type"] == "invalid_request_error"
    body = _error(
        lambda: oai.chat.completions.create(
            model="tiny", messages=[{"role": "tool", "content": "x"}], max_tokens=2
        ),
        openai.BadRequestError,
    )
    assert body["param"] == "messages[0].role"


def test_a_body_that_is_not_json_is_400(door: ServerThread) -> None:
    """(A body over the size limit is 413: `test_overload.py`, on a server with a small one.)"""
    for data in (b"{not json", b"[1, 2]", b'{"model": "tiny", "prompt": "hi"'):
        status, _, text = raw(door, "/v1/completions", data=data)
        error = json.loads(text)["error"]
        assert status == 400 and error["type"] == "invalid_request_error", (data, text)
    assert raw(door, "/v1/models")[0] == 200  # the door serves on


def test_an_echo_over_the_score_budget_is_400_naming_echo(oai: openai.OpenAI) -> None:
    prompt = list(range(5, 35))  # 30 tokens of prompt log-probabilities > 20
    body = _error(
        lambda: oai.completions.create(
            model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0
        ),
        openai.BadRequestError,
    )
    assert body["param"] == "echo" and "limited to 20 tokens" in body["message"]
    # Without logprobs an echo costs nothing extra.
    done = oai.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True)
    assert done.usage is not None and done.usage.prompt_tokens == 30


def test_unknown_model_is_404(oai: openai.OpenAI) -> None:
    for model in ("nope", "tiny@7", "tiny@production"):
        body = _error(
            lambda m=model: oai.completions.create(model=m, prompt="hi"), openai.NotFoundError
        )
        assert body["param"] == "model" and body["code"] == "model_not_found"
    _error(lambda: oai.models.retrieve("nope"), openai.NotFoundError)


def test_a_missing_or_wrong_token_is_401_and_logged_by_label(
    door: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-token-0123456789"
    with openai.OpenAI(base_url=f"{base_url(door)}/v1", api_key=wrong, max_retries=0) as c:
        body = _error(
            lambda: c.completions.create(model="tiny", prompt="hi"), openai.AuthenticationError
        )
        assert body["type"] == "authentication_error" and body["message"] == "invalid token"
        _error(c.models.list, openai.AuthenticationError)
    # The SDK always sends a key; without one (curl) it is the same 401.
    status, _, text = raw(door, "/v1/completions", {"model": "tiny", "prompt": "hi"}, token=None)
    assert status == 401 and "authorization" in json.loads(text)["error"]["message"]
    with caplog.at_level(logging.INFO, logger="slimserve"):
        status, _, _ = raw(door, "/v1/completions", {"model": "tiny", "prompt": "hi"})
    assert status == 200
    # The last: a retried or earlier request of this module may have logged one too.
    line = [r for r in caplog.records if getattr(r, "method", "") == "/v1/completions"][-1]
    assert vars(line)["principal"] == "alice" and vars(line)["code"] == "200"
    assert vars(line)["model"] == "tiny@1" and vars(line)["door"] == "http"


def test_while_the_engine_restarts_it_is_503(door: ServerThread, oai: openai.OpenAI) -> None:
    models = door.server.models
    pid = models.get("tiny").info.pid
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while models.serving("tiny"):
        assert time.monotonic() < deadline, "the engine never went down"
        time.sleep(0.02)
    body = _error(
        lambda: oai.completions.create(model="tiny", prompt="hi", max_tokens=2),
        openai.InternalServerError,
    )
    assert body["code"] == "not_ready"
    assert raw(door, "/health/ready", token=None)[0] == 503
    deadline = time.monotonic() + 60
    while raw(door, "/health/ready", token=None)[0] != 200:
        assert time.monotonic() < deadline, "never ready again"
        time.sleep(0.1)
    assert oai.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text


def test_metrics_count_the_http_door(door: ServerThread, oai: openai.OpenAI) -> None:
    port = door.server.metrics.port

    def count() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        key = 'slimserve_http_requests_total{route="/v1/chat/completions",status="200"}'
        lines = [ln for ln in text.splitlines() if ln.startswith(key)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = count()
    oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert count() == before + 1


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(
    door: ServerThread, oai: openai.OpenAI, grpc_client: Client
) -> None:
    """The second request with the same system prompt reports the reused tokens on both
    doors and in the metrics, and answers as the first did (greedy)."""
    system = "You are a terse assistant for the harbour office; answer in one line."
    messages: Any = [
        {"role": "system", "content": system},
        {"role": "user", "content": "the quick brown fox"},
    ]
    first = oai.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0
    )
    second = oai.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0
    )
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content
    other = [ChatMessage("system", system), ChatMessage("user", "hello world")]
    g = grpc_client.generate(other, max_new_tokens=4)
    assert g.cached_tokens >= len(system) // 8  # the template header and system prompt
    port = door.server.metrics.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("slimserve_prompt_cached_tokens"))
    assert float(line.rsplit(" ", 1)[1]) >= g.cached_tokens
