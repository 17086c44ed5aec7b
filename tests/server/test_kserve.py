"""The KServe v2 / Triton door through a real server and Triton's own client."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from slimserve.clients import Client
from slimserve.server.config import AuthConfig
from slimserve.server.kserve import SERVICE_NAME
from slimserve.server.kserve.tensors import join_bytes
from slimserve.v1.inference import grpc_service_pb2 as pb
from slimserve.v1.inference import grpc_service_pb2_grpc as kserve_grpc
from tests.conftest import tiny_server_config
from tests.helpers import ServerThread

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "the quick brown fox"
GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
TOKEN = "kserve-user-token-0123456789"
IMPLEMENTED = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
}


@pytest.fixture(scope="module")
def kserve(tiny_server: ServerThread) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(tiny_server.target)
    yield client
    client.close()


def _bytes(name: str, *values: str) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
    return tensor


def _bool(name: str, value: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def _inputs(
    prompt: str = PROMPT,
    *,
    stream: bool | None = None,
    exclude: bool | None = True,
    **sampling: Any,
) -> list[triton.InferInput]:
    inputs = [_bytes("text_input", prompt), _bytes("sampling_parameters", json.dumps(sampling))]
    if stream is not None:
        inputs.append(_bool("stream", stream))
    if exclude is not None:
        inputs.append(_bool("exclude_input_in_output", exclude))
    return inputs


def _text(result: Any) -> str:
    return "".join(v.decode() for v in result.as_numpy("text_output"))


def _final(result: Any) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)


class _Stream:
    """Collects a stream's callbacks: (result, error) pairs in arrival order."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def __call__(self, result: Any, error: Any) -> None:
        self.items.put((result, error))

    def until_final(self, timeout: float = 60.0) -> list[Any]:
        """Results up to and including one marked final (an error is raised)."""
        out = []
        while True:
            result, error = self.items.get(timeout=timeout)
            if error is not None:
                raise error
            out.append(result)
            if _final(result):
                return out


def test_health_and_metadata(kserve: triton.InferenceServerClient) -> None:
    assert kserve.is_server_live()
    assert kserve.is_server_ready()
    assert kserve.is_model_ready("tiny")
    assert kserve.is_model_ready("tiny", "1")
    assert kserve.is_model_ready("tiny", "latest")
    assert not kserve.is_model_ready("tiny", "2")
    assert not kserve.is_model_ready("nope")
    server = kserve.get_server_metadata()
    assert server.name == "slimserve"
    assert server.version
    meta = kserve.get_model_metadata("tiny")
    assert meta.name == "tiny"
    assert list(meta.versions) == ["1"]
    inputs = {t.name: t.datatype for t in meta.inputs}
    assert inputs == {
        "text_input": "BYTES",
        "stream": "BOOL",
        "sampling_parameters": "BYTES",
        "exclude_input_in_output": "BOOL",
        "labels": "BYTES",
    }
    outputs = {t.name: t.datatype for t in meta.outputs}
    assert outputs == {"text_output": "BYTES", "label_logprob": "FP64", "label_probability": "FP64"}
    with pytest.raises(InferenceServerException) as err:
        kserve.get_model_metadata("tiny", "2")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_unary_text_equals_slimserve_generate(
    kserve: triton.InferenceServerClient, tiny_server: ServerThread
) -> None:
    with Client(tiny_server.target, timeout=30) as client:
        expected = client.generate(PROMPT, max_new_tokens=12, ignore_eos=True).text
    result = kserve.infer("tiny", _inputs(**GREEDY), request_id="req-7")
    assert _text(result) == expected
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("tiny", "1", "req-7")
    # As in Triton's vLLM backend, the prompt is in the output unless excluded.
    with_prompt = kserve.infer("tiny", _inputs(exclude=None, **GREEDY), model_version="1")
    assert _text(with_prompt) == PROMPT + expected


def test_without_the_sampling_tensor_the_request_parameters_are_read(
    kserve: triton.InferenceServerClient, tiny_server: ServerThread
) -> None:
    """As vLLM's Triton backend: no `sampling_parameters` input, the request's parameters of
    those names instead (others are left alone)."""
    with Client(tiny_server.target, timeout=30) as client:
        expected = client.generate(PROMPT, max_new_tokens=5, ignore_eos=True)
    inputs = [_bytes("text_input", PROMPT), _bool("exclude_input_in_output", True)]
    params = {"max_tokens": 5, "ignore_eos": True, "temperature": 0.0, "tag": "x"}
    result = kserve.infer("tiny", inputs, parameters=params)
    assert _text(result) == expected.text and expected.generated_tokens == 5


def test_typed_contents_read_as_raw(
    kserve: triton.InferenceServerClient, tiny_server: ServerThread
) -> None:
    # tritonclient sends raw_input_contents; other clients send typed contents.
    def tensor(name: str, datatype: str, **contents: Any) -> Any:
        return pb.ModelInferRequest.InferInputTensor(
            name=name, datatype=datatype, shape=[1], contents=pb.InferTensorContents(**contents)
        )

    request = pb.ModelInferRequest(
        model_name="tiny",
        inputs=[
            tensor("text_input", "BYTES", bytes_contents=[PROMPT.encode()]),
            tensor("sampling_parameters", "BYTES", bytes_contents=[json.dumps(GREEDY).encode()]),
            tensor("exclude_input_in_output", "BOOL", bool_contents=[True]),
        ],
    )
    with grpc.insecure_channel(tiny_server.target) as channel:
        answer = kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    (output,) = answer.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("text_output", "BYTES", [1])
    assert answer.raw_output_contents[0][4:].decode() == _text(
        kserve.infer("tiny", _inputs(**GREEDY))
    )


def test_stream_of_deltas_joins_to_the_unary_text(kserve: triton.InferenceServerClient) -> None:
    unary = _text(kserve.infer("tiny", _inputs(**GREEDY)))
    stream = _Stream()
    kserve.start_stream(callback=stream)
    try:
        kserve.async_stream_infer(
            "tiny", _inputs(stream=True, exclude=None, **GREEDY), request_id="s1"
        )
        results = stream.until_final()
        # Triton's empty-final convention: the text, then an empty response marked final.
        kserve.async_stream_infer(
            "tiny", _inputs(stream=True, **GREEDY), enable_empty_final_response=True
        )
        with_empty = stream.until_final()
    finally:
        kserve.stop_stream()
    assert len(results) > 1
    assert [_final(r) for r in results] == [False] * (len(results) - 1) + [True]
    assert {r.get_response().id for r in results} == {"s1"}
    assert "".join(_text(r) for r in results) == unary
    *deltas, last = with_empty
    assert not last.get_response().outputs
    assert "".join(_text(r) for r in deltas) == unary


def test_stream_requests_answer_each_and_errors_do_not_end_the_stream(
    kserve: triton.InferenceServerClient,
) -> None:
    stream = _Stream()
    kserve.start_stream(callback=stream)
    try:
        kserve.async_stream_infer("nope", _inputs(stream=True, **GREEDY))
        result, error = stream.items.get(timeout=30)
        assert result is None
        assert "NOT_FOUND" in str(error)
        kserve.async_stream_infer("tiny", _inputs(stream=True, exclude=False, **GREEDY))
        _, error = stream.items.get(timeout=30)
        assert "INVALID_ARGUMENT" in str(error)
        # Not streamed: one response, the whole text, marked final.
        kserve.async_stream_infer("tiny", _inputs(**GREEDY))
        (whole,) = stream.until_final()
    finally:
        kserve.stop_stream()
    assert _text(whole) == _text(kserve.infer("tiny", _inputs(**GREEDY)))


def test_closing_the_stream_lets_requests_in_flight_finish(
    kserve: triton.InferenceServerClient,
) -> None:
    stream = _Stream()
    kserve.start_stream(callback=stream)
    for i in range(3):  # answered concurrently, each under its own id
        kserve.async_stream_infer("tiny", _inputs(stream=True, **GREEDY), request_id=f"r{i}")
    kserve.stop_stream()  # closes the sending side, then waits for the responses
    finals = set()
    while not stream.items.empty():
        result, error = stream.items.get()
        assert error is None
        if _final(result):
            finals.add(result.get_response().id)
    assert finals == {"r0", "r1", "r2"}


def test_labels_make_a_score(
    kserve: triton.InferenceServerClient, tiny_server: ServerThread
) -> None:
    labels = (" fox", " dog", " jumps")
    with Client(tiny_server.target, timeout=30) as client:
        expected = client.score(PROMPT, labels)
    result = kserve.infer("tiny", [_bytes("text_input", PROMPT), _bytes("labels", *labels)])
    logprob = result.as_numpy("label_logprob")
    probability = result.as_numpy("label_probability")
    assert logprob.dtype == np.float64
    assert logprob.tolist() == pytest.approx([s.logprob for s in expected.scores])
    assert probability.tolist() == pytest.approx([s.probability for s in expected.scores])
    assert probability.sum() == pytest.approx(1.0)
    only = kserve.infer(
        "tiny",
        [_bytes("text_input", PROMPT), _bytes("labels", *labels)],
        outputs=[triton.InferRequestedOutput("label_probability")],
    )
    assert only.as_numpy("label_logprob") is None
    assert only.as_numpy("label_probability").tolist() == pytest.approx(probability.tolist())


def _status(kserve: triton.InferenceServerClient, inputs: list[Any], model: str = "tiny") -> str:
    with pytest.raises(InferenceServerException) as err:
        kserve.infer(model, inputs)
    return f"{err.value.status()} {err.value.message()}"


def test_errors_map_to_status_codes(kserve: triton.InferenceServerClient) -> None:
    assert _status(kserve, _inputs(**GREEDY), "nope").startswith("StatusCode.NOT_FOUND")
    invalid = "StatusCode.INVALID_ARGUMENT"
    bad = {
        "unknown input": [*_inputs(**GREEDY), _bytes("image", "x")],
        "no prompt": [_bytes("sampling_parameters", "{}")],
        "empty prompt": _inputs("", **GREEDY),
        "stream on ModelInfer": _inputs(stream=True, **GREEDY),
        "unknown sampling key": _inputs(n=2),
        "a string for max_tokens": _inputs(max_tokens="8"),
        "over the server's limit": _inputs(max_tokens=10_000),
        "labels with sampling": [
            _bytes("text_input", PROMPT),
            _bytes("labels", " a"),
            _bytes("sampling_parameters", "{}"),
        ],
        "text as BOOL": [_bool("text_input", True)],
    }
    for why, inputs in bad.items():
        assert _status(kserve, inputs).startswith(invalid), why
    not_json = [_bytes("text_input", PROMPT), _bytes("sampling_parameters", "{max_tokens")]
    assert "not JSON" in _status(kserve, not_json)


def test_malformed_raw_bytes_are_invalid(tiny_server: ServerThread) -> None:
    text = pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
    cases = {
        "length past the end": [join_bytes([PROMPT.encode()])[:-3]],
        "two elements for shape [1]": [join_bytes([b"a", b"b"])],
        "raw for one of two inputs": [join_bytes([b"a"])],
    }
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        for why, raw in cases.items():
            inputs = [text] if "two inputs" not in why else [text, text]
            request = pb.ModelInferRequest(model_name="tiny", inputs=inputs, raw_input_contents=raw)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why


def test_every_other_rpc_is_unimplemented(tiny_server: ServerThread) -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    others = [m for m in service.methods if m.name not in IMPLEMENTED]
    assert len(others) == len(service.methods) - len(IMPLEMENTED)
    with grpc.insecure_channel(tiny_server.target) as channel:
        for method in others:
            call = channel.unary_unary(f"/{SERVICE_NAME}/{method.name}")
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, method.name


@pytest.fixture(scope="module")
def auth_server(tiny_registry: Path) -> Iterator[ServerThread]:
    config = dataclasses.replace(tiny_server_config(tiny_registry), auth=AuthConfig(tokens={TOKEN}))
    server = ServerThread(config).start()
    yield server
    server.stop()


def test_a_bearer_token_is_required_when_the_server_has_tokens(auth_server: ServerThread) -> None:
    bearer = {"authorization": f"Bearer {TOKEN}"}
    with triton.InferenceServerClient(auth_server.target) as kserve:
        for call in (kserve.is_server_ready, kserve.get_server_metadata):
            with pytest.raises(InferenceServerException) as err:
                call()
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        assert kserve.is_server_ready(headers=bearer)
        assert _text(kserve.infer("tiny", _inputs(**GREEDY), headers=bearer))
        stream = _Stream()
        kserve.start_stream(callback=stream)
        try:
            # The refusal may end the stream before this request is even sent.
            with contextlib.suppress(InferenceServerException):
                kserve.async_stream_infer("tiny", _inputs(stream=True, **GREEDY))
            _, error = stream.items.get(timeout=30)
        finally:
            kserve.stop_stream()
        assert error.status() == "StatusCode.UNAUTHENTICATED"


def test_the_stream_gets_an_access_log_line_like_every_call(
    kserve: triton.InferenceServerClient, caplog: pytest.LogCaptureFixture
) -> None:
    stream = _Stream()
    with caplog.at_level("INFO", logger="slimserve.server.interceptors"):
        kserve.start_stream(callback=stream)
        try:
            kserve.async_stream_infer("tiny", _inputs(stream=True, **GREEDY))
            stream.until_final()
        finally:
            kserve.stop_stream()
        deadline = time.monotonic() + 10
        while not any(r.getMessage().startswith("ModelStreamInfer") for r in caplog.records):
            assert time.monotonic() < deadline, "no access-log line for the stream"
            time.sleep(0.02)
    (line,) = [r for r in caplog.records if r.getMessage().startswith("ModelStreamInfer")]
    assert getattr(line, "principal", None) == "anonymous"
    assert getattr(line, "code", None) in ("OK", "CANCELLED")
