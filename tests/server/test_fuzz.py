"""Fuzzing every door of a real server: no client mistake is an internal error.

- gRPC, every service the server reflects (slimserve's, KServe's, health): messages built
  from the descriptors the server's own reflection serves, field by field, sane values mixed
  with hostile ones; 2,000 calls, and none may answer INTERNAL or UNKNOWN.
- HTTP, the OpenAI routes: JSON bodies built from the fields each route knows and from
  anything else JSON can hold (deep nesting, huge integers, lone surrogates, NaN); 2,000
  calls, and none may answer 500.

The examples are derandomized (the same inputs every run) and not shrunk: if the server
broke, every later example would wait for its deadline. After each fuzz the server still
serves a normal request, and its engine holds no request.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from slimserve.clients import Client
from slimserve.server.config import Limits
from slimserve.server.openai import schema
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread

CALLS = 600  # 2,000 took 113 s in CI, too much of the default run's ~15 minutes
LIMITS = Limits(max_new_tokens=6, default_max_new_tokens=4, max_prompt_tokens=40, max_top_n=3)
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(
    max_examples=CALLS,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def server(tiny_registry: Path) -> Iterator[ServerThread]:
    config = dataclasses.replace(
        tiny_server_config(tiny_registry, limits=LIMITS, max_score_tokens=200), http_port=0
    )
    server = ServerThread(config).start()
    yield server
    server.stop()


def _still_serving(server: ServerThread) -> None:
    with Client(server.target, retries=0, timeout=30) as c:
        assert c.health() == "SERVING"
        assert c.generate("the quick brown", max_new_tokens=3, ignore_eos=True).generated_tokens
    stats = server.server.models.get("tiny").engine.stats()
    assert stats.running == 0 and stats.queued == 0


# ---- gRPC, from the server's reflection ----------------------------------------------------
SANE_STRINGS = ["tiny", "tiny@1", "1", "", "hello", "text_input", "labels", "stream",
                "sampling_parameters", "text_output", '{"max_tokens": 3}', "user"]  # fmt: skip
strings = st.one_of(
    st.sampled_from(SANE_STRINGS),
    st.text(max_size=30),
    st.sampled_from(["a " * 300, "\U0001f642" * 40, "\x00", "../x", "tiny@latest"]),
)
blobs = st.one_of(
    st.binary(max_size=24),
    # tritonclient's BYTES encoding: a 4-byte little-endian length before each element.
    st.lists(st.binary(max_size=12), max_size=3).map(
        lambda xs: b"".join(len(x).to_bytes(4, "little") + x for x in xs)
    ),
    st.sampled_from([b"\x05\x00\x00\x00hello", b"\x01", b"\xff" * 9]),
)
_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INTS:
        low, high = _INTS[t]
        return st.one_of(st.integers(0, 8), st.sampled_from([low, high]), st.integers(low, high))
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if t == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(
            st.floats(0, 2, width=width),
            st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e-45, 3.4e38]),
        )
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return strings
    if t == FieldDescriptor.TYPE_BYTES:
        return blobs
    if t == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-3, 99))
    raise AssertionError(f"unhandled field type {t}")


def _message(desc: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = _scalar(field.message_type.fields_by_name["key"])
            value_field = field.message_type.fields_by_name["value"]
            value = (
                _message(value_field.message_type, depth + 1)
                if value_field.message_type is not None
                else _scalar(value_field)
            )
            optional[field.name] = st.dictionaries(key, value, max_size=3)
            continue
        one = (
            _message(field.message_type, depth + 1)
            if field.message_type is not None
            else _scalar(field)
        )
        repeated = field.is_repeated
        optional[field.name] = st.lists(one, max_size=3) if repeated else one
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: cls(**kw))


def _methods(channel: grpc.Channel) -> list[MethodDescriptor]:
    """Every method the server reflects (but the reflection service itself, health's
    endless Watch and model control), the ones it serves weighted over those it answers
    UNIMPLEMENTED (KServe's repository, statistics and shared memory: one in ten)."""
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(database)
    served, unimplemented = [], []
    for name in database.get_services():
        if name.startswith("grpc.reflection"):
            continue
        service = pool.FindServiceByName(name)
        for m in service.methods:
            if m.name in ("Watch", "LoadModel", "UnloadModel"):
                continue
            empty = message_factory.GetMessageClass(m.input_type)()
            code = _call(channel, m, empty)
            (unimplemented if code is grpc.StatusCode.UNIMPLEMENTED else served).append(m)
    return served * 10 + unimplemented


@pytest.fixture(scope="module")
def grpc_methods(server: ServerThread) -> Iterator[tuple[grpc.Channel, list[MethodDescriptor]]]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel, _methods(channel)


def _call(channel: grpc.Channel, method: MethodDescriptor, request: Any) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    response = message_factory.GetMessageClass(method.output_type)
    kw = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response.FromString,
    }
    try:
        if method.client_streaming:  # KServe's ModelStreamInfer: a few requests, then done
            call = channel.stream_stream(path, **kw)
            for _ in call(iter([request, request]), timeout=10):
                pass
        elif method.server_streaming:
            for _ in channel.unary_stream(path, **kw)(request, timeout=10):
                pass
        else:
            channel.unary_unary(path, **kw)(request, timeout=10)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def test_the_reflection_fuzz_of_every_service_finds_no_internal_error(
    server: ServerThread, grpc_methods: tuple[grpc.Channel, list[MethodDescriptor]]
) -> None:
    channel, methods = grpc_methods
    services = {m.containing_service.full_name for m in methods}
    assert {"slimserve.v1.GenerationService", "inference.GRPCInferenceService"} <= services
    codes: dict[str, int] = {}

    @FUZZ
    @given(data=st.data())
    def one_call(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(methods))
        request = data.draw(_message(method.input_type))
        code = _call(channel, method, request)
        codes[code.name] = codes.get(code.name, 0) + 1
        assert code not in BAD, f"{method.full_name} answered {code} for {request}"

    one_call()
    assert sum(codes.values()) >= CALLS
    assert codes.get("OK", 0) > CALLS // 20, codes  # the fuzz reached the engine, not only refusals
    _still_serving(server)


# ---- HTTP, the OpenAI routes ---------------------------------------------------------------
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40),
    st.sampled_from([10**400, -(10**30), 2**64, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["tiny", "hello", "\ud800", "user", "json_object", "text"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user"] * 6 + ["system", "assistant", "tool"]),
            "content": st.one_of(*[st.sampled_from(SANE_STRINGS)] * 4, strings, json_values),
        }
    ),
    min_size=1,
    max_size=3,
)
#: Each route's input field, and values for it (mostly valid).
INPUTS = {
    "/v1/completions": (
        "prompt",
        st.one_of(*[st.sampled_from(SANE_STRINGS)] * 3, strings, st.lists(st.integers(-2, 400))),
    ),
    "/v1/chat/completions": ("messages", messages),
    "/v1/responses": ("input", st.one_of(st.sampled_from(SANE_STRINGS), strings, messages)),
}
#: Fields the routes know, with sane values and, one time in four, any JSON at all.
KNOWN = {
    "max_tokens": st.integers(-1, 8),
    "max_output_tokens": st.integers(-1, 8),
    "temperature": st.sampled_from([0, 0.7, 1, -1, 1e-9, 10**400]),
    "top_p": st.sampled_from([0.5, 1, 0, 2]),
    "top_k": st.integers(-2, 50),
    "n": st.integers(0, 3),
    "seed": st.sampled_from([0, 7, -1, 2**64]),
    "stream": st.booleans(),
    "stop": st.one_of(strings, st.lists(strings, max_size=3)),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 4)),
    "top_logprobs": st.integers(-1, 4),
    "echo": st.booleans(),
    "ignore_eos": st.booleans(),
    "instructions": strings,
    "response_format": st.sampled_from(
        [{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {"type": "xml"},
         {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}}]
    ),
    "guided_choice": st.lists(strings, max_size=3),
    "guided_regex": st.sampled_from(["[a-z]+", "(", "\\d{2}"]),
    "stream_options": st.sampled_from([{"include_usage": True}, {}, None, 3]),
    "junk": json_values,
}  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn, route: str) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # anything at all
    key, values = INPUTS[route]
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(["tiny"] * 8 + ["tiny@1", "nope", "tiny@9", 3])),
        key: draw(values),
        "max_tokens" if route != "/v1/responses" else "max_output_tokens": draw(st.integers(1, 6)),
    }
    kind = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}.get(route, "responses")
    known = sorted(f for f in KNOWN if f in schema.KNOWN[kind])  # type: ignore[index]
    for field in draw(st.lists(st.sampled_from([*known, "junk"]), max_size=3, unique=True)):
        hostile = draw(st.integers(0, 5)) == 0
        body[field] = draw(json_values if hostile else KNOWN[field])
    return body


ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/responses"]


def test_the_http_fuzz_finds_no_server_error(server: ServerThread) -> None:
    port = server.server.http.port
    statuses: dict[int, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(route: str, raw: bytes) -> int:
        nonlocal conn
        for attempt in range(2):
            try:
                conn.request("POST", route, raw, {"content-type": "application/json"})
                response = conn.getresponse()
                response.read()
                return response.status
            except (http.client.HTTPException, OSError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    @FUZZ
    @given(data=st.data())
    def one_call(data: st.DataObject) -> None:
        route = data.draw(st.sampled_from(ROUTES))
        body = data.draw(bodies(route))
        raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
        status = post(route, raw)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, f"{route} answered {status} for {raw[:300]!r}"

    try:
        one_call()
        deep = b"[" * 100_000 + b"]" * 100_000
        assert post("/v1/completions", deep) == 400
        assert post("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": 1'
                    + b"0" * 400 + b"}") == 400  # fmt: skip
        assert post("/v1/chat/completions", b'{"model": "tiny", "messages": '
                    b'[{"role": "user", "content": "\\ud800"}]}') == 400  # fmt: skip
    finally:
        conn.close()
    assert sum(statuses.values()) >= CALLS
    assert statuses.get(200, 0) > CALLS // 20, statuses  # the fuzz reached the engine too
    _still_serving(server)
