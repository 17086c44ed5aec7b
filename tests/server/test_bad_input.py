"""Request limits by name, and a property test over raw request bytes.

The property test builds protobuf wire bytes by hand, so it can send what no well-behaved
client would: invalid UTF-8 and lone surrogates (CESU-8) in string fields, corrupt wire
formats, NaN/inf/denormal floats, out-of-range integers, empty and huge values.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from slimserve.clients import ChatMessage, Client, InvalidArgument, Sampling
from slimserve.server.config import Limits
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread

SMALL = Limits(
    max_new_tokens=32,
    default_max_new_tokens=8,
    max_prompt_tokens=40,
    max_stop_sequences=2,
    max_stop_sequence_chars=8,
    max_top_n=3,
    max_labels=3,
    max_message_bytes=2048,
)


@pytest.fixture(scope="module")
def limited(tiny_registry: Path) -> Iterator[ServerThread]:
    # Model control open, so the fuzz reaches LoadModel's parsing rather than its refusal.
    config = dataclasses.replace(
        tiny_server_config(tiny_registry), limits=SMALL, allow_model_control=True
    )
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("call", "field", "limit"),
    [
        (dict(max_new_tokens=33), "stopping.max_new_tokens", "max_new_tokens"),
        (dict(prompt="hello " * 60), "text", "max_prompt_tokens"),
        (dict(prompt=[ChatMessage("user", "hello " * 60)]), "chat", "max_prompt_tokens"),
        (dict(stop=["a", "b", "c"]), "stopping.stop_sequences", "max_stop_sequences"),
        (dict(stop=["123456789"]), "stopping.stop_sequences[0]", "max_stop_sequence_chars"),
        (dict(top_n=4), "response.top_n", "max_top_n"),
        (dict(prompt="x" * 3000), "request", "max_message_bytes"),
        (dict(stop=["é" * 8] * 2, prompt="y" * 2100), "request", "max_message_bytes"),
    ],
)
def test_each_exceeded_limit_is_invalid_argument_naming_it(
    limited: ServerThread, call: dict[str, Any], field: str, limit: str
) -> None:
    prompt = call.pop("prompt", "hello")
    with Client(limited.target, retries=0, timeout=30) as c:
        with pytest.raises(InvalidArgument, match=limit) as err:
            c.generate(prompt, **call)
        assert err.value.field == field
        with pytest.raises(InvalidArgument, match=limit):
            list(c.stream(prompt, **call))
        # At the limit itself the request is served.
        assert c.generate("hello", max_new_tokens=32, top_n=3, stop=["12345678", "z"]).model


def test_score_limits(limited: ServerThread) -> None:
    with Client(limited.target, retries=0, timeout=30) as c:
        with pytest.raises(InvalidArgument, match="max_labels") as err:
            c.score("hello", [" a", " b", " c", " d"])
        assert err.value.field == "labels"
        with pytest.raises(InvalidArgument, match="max_prompt_tokens"):
            c.score("hello " * 60, [" a"])
        with pytest.raises(InvalidArgument, match="max_message_bytes"):
            c.score("hello", [" a", "b" * 3000])
        assert len(c.score("hello", [" a", " b", " c"]).scores) == 3


def test_sampling_values_that_would_overflow_are_refused(limited: ServerThread) -> None:
    with Client(limited.target, retries=0, timeout=30) as c:
        for sampling, field in (
            (Sampling(do_sample=True, temperature=1e-30), "sampling.temperature"),
            (Sampling(do_sample=True, repetition_penalty=1e-30), "sampling.repetition_penalty"),
            (Sampling(do_sample=True, repetition_penalty=1e30), "sampling.repetition_penalty"),
            (Sampling(repetition_penalty=float("inf")), "sampling.repetition_penalty"),
        ):
            with pytest.raises(InvalidArgument) as err:
                c.generate("hello", sampling=sampling)
            assert err.value.field == field


# ---- raw protobuf wire bytes -------------------------------------------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers are ten-byte two's complement on the wire
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _len(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(payload)) + payload


def _int(number: int, value: int) -> bytes:
    return _tag(number, 0) + _varint(value)


def _f32(number: int, value: float) -> bytes:
    return _tag(number, 5) + struct.pack("<f", value)


BAD_UTF8 = [
    b"\xed\xa0\x80",  # lone high surrogate U+D800 in CESU-8
    b"\xed\xbf\xbf",  # lone low surrogate U+DFFF
    b"\xed\xa0\xbd\xed\xb8\x80",  # a surrogate pair, CESU-8 style
    b"\xc0\x80",  # overlong NUL
    b"\xff\xfe",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"abc\x80",  # truncated sequence
]
# Every field is usually sane, so that many requests get through to the engine with the odd
# field extreme; the rest are hostile on purpose.
sane = st.text("abcdefghij klmnopé日🙂,.", min_size=1, max_size=20).map(str.encode)
weird_strings = st.one_of(
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(BAD_UTF8),
    st.binary(max_size=24),
    st.sampled_from([b"", b" ", b"\x00", b"\n" * 10, "🙂".encode() * 50]),
    st.sampled_from([b"a " * 500, "é".encode() * 600]),  # past max_prompt_tokens
)
strings = st.one_of(sane, sane, weird_strings)
weird_floats = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, 1e-45, 1e-38, 1e-4, 3.4e38, -1.0, math.nan, math.inf, -math.inf]),
)
floats = st.one_of(st.floats(0.0, 2.0, width=32), weird_floats)
weird_ints = st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, -1])
ints = st.one_of(st.integers(min_value=0, max_value=40), weird_ints)
model_ref = st.builds(
    lambda name, ref: _len(1, name) + _len(2, ref),
    st.one_of(st.just(b"tiny"), st.just(b""), weird_strings),
    st.one_of(
        st.sampled_from([b"", b"1", b"latest"]),
        st.sampled_from([b"7", b"../..", "١".encode(), b"Prod", b"production"]),
        weird_strings,
    ),
)
chat = st.lists(
    st.builds(lambda r, c: _len(1, _len(1, r) + _len(2, c)),
              st.one_of(st.sampled_from([b"user", b"system", b"assistant"]), strings), strings),
    max_size=4,
).map(b"".join)  # fmt: skip
prompt = st.one_of(
    strings.map(lambda s: _len(2, s)),
    strings.map(lambda s: _len(2, s)),
    chat.map(lambda c: _len(3, c)),
    st.just(b""),
)


def _fields(*parts: bytes | None) -> bytes:
    return b"".join(p for p in parts if p is not None)


def _maybe(strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes | None]:
    return st.one_of(st.none(), strategy)


sampling = st.builds(
    _fields,
    _maybe(st.builds(_int, st.just(1), st.integers(0, 2))),  # do_sample (2 is not a bool)
    _maybe(st.builds(_f32, st.just(2), floats)),  # temperature
    _maybe(st.builds(_int, st.just(3), ints)),  # top_k
    _maybe(st.builds(_f32, st.just(4), floats)),  # top_p
    _maybe(st.builds(_int, st.just(5), ints)),  # seed
    _maybe(st.builds(_f32, st.just(6), floats)),  # repetition_penalty
)
stopping = st.lists(
    st.one_of(
        st.builds(_int, st.sampled_from([1, 3, 4]), ints),  # max_new_tokens, time, ignore_eos
        st.builds(_len, st.just(2), strings),  # stop sequences
    ),
    max_size=3,
).map(b"".join)
response = st.lists(st.builds(_int, st.sampled_from([1, 2, 3]), ints), max_size=3).map(b"".join)
generate_request = st.builds(
    lambda m, p, s, t, r, extra: _len(1, m) + p + _len(4, s) + _len(5, t) + _len(6, r) + extra,
    model_ref,
    prompt,
    sampling,
    stopping,
    response,
    st.one_of(st.just(b""), st.just(b""), st.binary(max_size=8)),  # garbage / unknown fields
)
score_request = st.builds(
    lambda m, p, labels: _len(1, m) + p + b"".join(_len(4, x) for x in labels),
    model_ref,
    prompt,
    st.lists(strings, max_size=5),
)
tokenize_request = st.builds(
    lambda m, p, flag: _len(1, m) + p + _int(4, flag), model_ref, prompt, ints
)
model_request = st.builds(lambda n, r: _len(1, n) + _len(2, r), strings, strings)

METHODS = {
    "/slimserve.v1.GenerationService/Generate": generate_request,
    "/slimserve.v1.GenerationService/GenerateStream": generate_request,
    "/slimserve.v1.GenerationService/Score": score_request,
    "/slimserve.v1.GenerationService/Tokenize": tokenize_request,
    "/slimserve.v1.ModelService/GetModelInfo": model_request,
    "/slimserve.v1.ModelService/LoadModel": model_request,
}
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@pytest.fixture(scope="module")
def raw_channel(limited: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(limited.target) as channel:
        yield channel


def _send(channel: grpc.Channel, method: str, body: bytes) -> grpc.StatusCode:
    try:
        if method.endswith("GenerateStream"):
            for _ in channel.unary_stream(method)(body, timeout=10):
                pass
        else:
            channel.unary_unary(method)(body, timeout=10)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # the same inputs on every run (CI must not flake)
    database=None,
    # No shrinking: if the server broke, every later example would wait for its deadline.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(data=st.data())
def test_random_requests_never_internal(raw_channel: grpc.Channel, data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(sorted(METHODS)))
    body = data.draw(METHODS[method])
    code = _send(raw_channel, method, body)
    assert code in ALLOWED, f"{method} answered {code} for {body!r}"


# A well-formed envelope (default model, a plain prompt) around extreme generation options,
# so that most requests reach the engine: sampling, stopping and top-n at their edges.
engine_request = st.builds(
    lambda p, s, t, r: _len(2, p) + _len(4, s) + _len(5, t) + _len(6, r),
    sane,
    sampling,
    stopping,
    response,
)


def _sample_with(temperature: float = 1.0, penalty: float = 1.0, top_p: float = 1.0) -> bytes:
    sampling = _int(1, 1) + _f32(2, temperature) + _f32(4, top_p) + _f32(6, penalty)
    return _len(2, b"hello") + _len(4, sampling) + _len(5, _int(1, 8))


@FUZZ
@given(stream=st.booleans(), body=engine_request)
# Found by reading the sampler: each of these once overflowed to inf/NaN probabilities and
# killed the engine thread, so every later request hung.
@example(stream=False, body=_sample_with(temperature=1e-45))
@example(stream=True, body=_sample_with(temperature=1e-40))
@example(stream=False, body=_sample_with(penalty=1e-45))
@example(stream=False, body=_sample_with(penalty=3.4e38, top_p=1e-45))
def test_extreme_generation_options_never_internal(
    raw_channel: grpc.Channel, stream: bool, body: bytes
) -> None:
    method = "/slimserve.v1.GenerationService/" + ("GenerateStream" if stream else "Generate")
    code = _send(raw_channel, method, body)
    assert code in ALLOWED, f"{method} answered {code} for {body!r}"


def test_corrupt_wire_bytes_are_invalid_argument(raw_channel: grpc.Channel) -> None:
    for body in (b"\xff\xff\xff", b"\x12\x05ab", _len(2, b"\xed\xa0\x80"), b"\x0a\xff\xff\xff\x0f"):
        code = _send(raw_channel, "/slimserve.v1.GenerationService/Generate", body)
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_still_serving_after_the_fuzz(limited: ServerThread) -> None:
    # Runs after the property test (file order): nothing leaked, a normal request works.
    engine = limited.server.models.get("tiny").engine
    with Client(limited.target, retries=0, timeout=30) as c:
        assert c.health() == "SERVING"
        g = c.generate("the quick brown", max_new_tokens=4, ignore_eos=True)
        assert g.generated_tokens == 4 and g.model == "tiny@1"
    stats = engine.stats()
    assert stats.running == 0 and stats.queued == 0 and stats.free_slots == 4
