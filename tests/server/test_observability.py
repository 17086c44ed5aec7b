"""Prometheus metrics scraped over HTTP, JSON access logs, and request ids end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from slimserve.clients import Client, InvalidArgument
from slimserve.server import logs
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`{(sample name, sorted labels): value}` from a /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class _JsonLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(logs.RequestIdFilter())
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture()
def json_log() -> Iterator[_JsonLines]:
    handler = _JsonLines()
    logger = logging.getLogger("slimserve")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture(scope="module")
def metrics_server(tiny_registry: Path) -> Iterator[ServerThread]:
    config = dataclasses.replace(tiny_server_config(tiny_registry), metrics_port=0)
    server = ServerThread(config).start()
    yield server
    server.stop()


def test_metrics_endpoint_after_requests(metrics_server: ServerThread) -> None:
    port = metrics_server.server.metrics.port
    assert port
    tiny = {"model": "tiny", "version": "1"}
    before = scrape(port)
    with Client(metrics_server.target, retries=0, timeout=30) as c:
        unary = c.generate("hello", max_new_tokens=6, ignore_eos=True)
        chunks = list(c.stream("café", max_new_tokens=5, ignore_eos=True))
        score = c.score("the quick", [" fox", " dog"])
        with pytest.raises(InvalidArgument):
            c.generate("hello", max_new_tokens=10_000)
    # context.abort sends the status before the handler's `finally` counts the call: the
    # client can see the error a moment before the counter moves.
    invalid = {"method": "Generate", "code": "INVALID_ARGUMENT"}
    deadline = time.monotonic() + 5.0
    after = scrape(port)
    while (
        value(after, "slimserve_rpcs_total", **invalid)
        == value(before, "slimserve_rpcs_total", **invalid)
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
        after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    prompt = unary.input_tokens + chunks[-1].input_tokens + score.input_tokens
    assert delta("slimserve_prompt_tokens_total", **tiny) == prompt
    assert delta("slimserve_generated_tokens_total", **tiny) == 6 + 5
    assert delta("slimserve_time_to_first_token_seconds_count", **tiny) == 2
    assert delta("slimserve_queue_time_seconds_count", **tiny) == 2
    assert delta("slimserve_inter_token_latency_seconds_count", **tiny) == (6 - 1) + (5 - 1)
    assert delta("slimserve_inter_token_latency_seconds_sum", **tiny) > 0
    for method in ("Generate", "GenerateStream", "Score"):
        assert delta("slimserve_request_duration_seconds_count", **tiny, method=method) == 1
    assert delta("slimserve_rpcs_total", method="Generate", code="OK") == 1
    assert delta("slimserve_rpcs_total", method="Generate", code="INVALID_ARGUMENT") == 1
    # Gauges come from the engine itself: idle now, every slot free.
    assert value(after, "slimserve_requests_running", **tiny) == 0
    assert value(after, "slimserve_requests_queued", **tiny) == 0
    assert value(after, "slimserve_slots_free", **tiny) == 4


def test_request_id_is_echoed_and_logged_as_json(
    metrics_server: ServerThread, json_log: _JsonLines
) -> None:
    with Client(metrics_server.target, retries=0, timeout=30) as c:
        g = c.generate("hello", max_new_tokens=2, request_id="req-abc-123")
        s = list(c.stream("hello", max_new_tokens=2, request_id="req-stream-9"))
        sc = c.score("hello", [" a"], request_id="req-score-7")
        generated = c.generate("hello", max_new_tokens=1)
        unsafe = c.generate("hello", max_new_tokens=1, request_id="has spaces")
        huge = c.generate("hello", max_new_tokens=1, request_id="x" * 200)
    assert g.request_id == "req-abc-123"
    assert s[0].request_id == "req-stream-9"
    assert sc.request_id == "req-score-7"
    assert len(generated.request_id) == 32  # made by the server
    assert len(unsafe.request_id) == 32 and len(huge.request_id) == 32
    access = {
        line["request_id"]: line
        for line in json_log.lines
        if line["logger"] == "slimserve.server.interceptors"
    }
    line = access["req-abc-123"]
    assert line["method"] == "Generate" and line["code"] == "OK" and line["model"] == "tiny@1"
    assert line["principal"] == "anonymous"  # no tokens configured
    assert line["generated_tokens"] == 2 and line["level"] == "INFO" and line["ms"] >= 0
    assert access["req-stream-9"]["method"] == "GenerateStream"
    assert access["req-score-7"]["model"] == "tiny@1"
    assert generated.request_id in access


def test_json_formatter_carries_request_id_and_exceptions() -> None:
    token = logs.REQUEST_ID.set("rid-1")
    try:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom %d", (7,), None)
        try:
            raise ValueError("bad")
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
        logs.RequestIdFilter().filter(record)
        out = json.loads(logs.JsonFormatter().format(record))
    finally:
        logs.REQUEST_ID.reset(token)
    assert out["request_id"] == "rid-1" and out["message"] == "boom 7"
    assert "ValueError: bad" in out["exc"] and out["level"] == "ERROR"


def test_one_request_id_rule() -> None:
    for good in ("a", "req-abc-123", "x" * 128, "~!{}[]"):
        assert logs.valid_request_id(good)
        assert logs.request_id_from([("x-request-id", good)]) == good
    for bad in ("", "has spaces", "x" * 129, "café", "tab\t", b"bytes", None):
        assert not logs.valid_request_id(bad)
    fresh = logs.request_id_from([("x-request-id", "has spaces")])
    assert len(fresh) == 32 and int(fresh, 16) >= 0
    assert len(logs.request_id_from(None)) == 32
    first = [("other", "x"), ("x-request-id", "first"), ("x-request-id", "second")]
    assert logs.request_id_from(first) == "first"


def test_each_phase_is_in_the_response_timings_and_in_a_histogram(
    metrics_server: ServerThread,
) -> None:
    from slimserve.clients import ChatMessage

    port = metrics_server.server.metrics.port
    assert port
    before = scrape(port)
    with Client(metrics_server.target, retries=0, timeout=30) as c:
        chat = c.generate([ChatMessage("user", "hello there")], max_new_tokens=4, ignore_eos=True)
        text = list(c.stream("café au lait", max_new_tokens=4, ignore_eos=True))[-1]
    t = chat.timings
    assert t is not None and text.timings is not None
    # The door parsed, the engine process rendered the template and tokenized ...
    assert t.parse_ms > 0 and t.template_ms > 0 and t.tokenize_ms > 0
    # ... a text prompt has no template; a stream's earlier events were rendered.
    assert text.timings.template_ms == 0 and text.timings.tokenize_ms > 0
    assert text.timings.render_ms > 0 and text.timings.parse_ms > 0
    for timings in (t, text.timings):  # the first token's hops, both ways: under a second
        assert 0 <= timings.first_token_out_ms < 1e3
    after = scrape(port)

    def count(phase: str) -> float:
        name = "slimserve_request_phase_seconds_count"
        labels = {"model": "tiny", "version": "1", "phase": phase}
        return value(after, name, **labels) - value(before, name, **labels)

    assert count("template") == 1  # the chat only
    assert count("tokenize") == count("parse") == count("queue") == count("prefill") == 2
    assert count("render") == 2
