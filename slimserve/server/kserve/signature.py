"""The tensors a KServe request carries, read as a slimserve Generate or Score request.

Names and meanings follow Triton's vLLM backend, so its clients work unchanged:

- `text_input` (BYTES, 1 element): the prompt.
- `stream` (BOOL, 1): one response per text delta; only over ModelStreamInfer.
- `sampling_parameters` (BYTES, 1): a JSON object, vLLM's names: `max_tokens`,
  `temperature` (0 = greedy; vLLM's default 1.0 samples), `top_p`, `top_k` (0 or -1 = no
  limit), `seed`, `stop` (a string or a list), `ignore_eos`, `repetition_penalty`. Without
  the tensor, the request's parameters of those names are read instead (as vLLM does).
- `exclude_input_in_output` (BOOL, 1): leave the prompt out of `text_output`. As in vLLM
  the prompt is included unless streaming, where including it is refused.
- `labels` (BYTES, 1 or more): turns the request into a Score of each label as a
  continuation of `text_input`, answered by `label_logprob` and `label_probability`
  (FP64, one per label). Only `text_input` may accompany it.

Every field is checked here and named on failure (InvalidRequest); the ranges and limits
themselves are checked by `convert`, as for slimserve's own requests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimserve.engine.errors import InvalidRequest
from slimserve.server.kserve.tensors import BOOL, BYTES, FP64, Tensor, decode_inputs
from slimserve.v1 import generation_pb2 as gen_pb
from slimserve.v1.inference import grpc_service_pb2 as pb

TEXT_INPUT = "text_input"
STREAM = "stream"
SAMPLING = "sampling_parameters"
EXCLUDE_INPUT = "exclude_input_in_output"
LABELS = "labels"
TEXT_OUTPUT = "text_output"
LABEL_LOGPROB = "label_logprob"
LABEL_PROBABILITY = "label_probability"

#: name -> (datatype, shape) as ModelMetadata states them; -1 = any length.
INPUTS: dict[str, tuple[str, list[int]]] = {
    TEXT_INPUT: (BYTES, [1]),
    STREAM: (BOOL, [1]),
    SAMPLING: (BYTES, [1]),
    EXCLUDE_INPUT: (BOOL, [1]),
    LABELS: (BYTES, [-1]),
}
GENERATE_OUTPUTS: dict[str, tuple[str, list[int]]] = {TEXT_OUTPUT: (BYTES, [-1])}
SCORE_OUTPUTS: dict[str, tuple[str, list[int]]] = {
    LABEL_LOGPROB: (FP64, [-1]),
    LABEL_PROBABILITY: (FP64, [-1]),
}
OUTPUTS = {**GENERATE_OUTPUTS, **SCORE_OUTPUTS}

#: The sampling settings understood (vLLM's names); any other is refused, not ignored.
_SAMPLING_KEYS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "ignore_eos",
    "repetition_penalty",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class InferCall:
    """A KServe request read: exactly one of `generate` and `score` is set."""

    generate: gen_pb.GenerateRequest | None = None
    score: gen_pb.ScoreRequest | None = None
    stream: bool = False
    #: Prepend the prompt to `text_output` (vLLM's `exclude_input_in_output` false).
    include_prompt: bool = False
    #: The outputs to return, in order.
    outputs: tuple[str, ...] = ()


def read_call(request: pb.ModelInferRequest) -> InferCall:
    """`request` as a slimserve Generate or Score request. Raises InvalidRequest."""
    inputs = decode_inputs(request)
    for name in inputs:
        if name not in INPUTS:
            raise InvalidRequest(
                f"inputs[{name}]", f"is not an input of this model (inputs: {', '.join(INPUTS)})"
            )
    for name, tensor in inputs.items():
        if tensor.datatype != INPUTS[name][0]:
            raise InvalidRequest(
                f"inputs[{name}]", f"must be {INPUTS[name][0]}, got {tensor.datatype}"
            )
    model = gen_pb.ModelRef(name=request.model_name, ref=request.model_version)
    prompt = _text(inputs, TEXT_INPUT)
    if LABELS in inputs:
        extra = sorted(set(inputs) - {TEXT_INPUT, LABELS})
        if extra:
            raise InvalidRequest(
                f"inputs[{extra[0]}]", "cannot accompany labels (a Score takes text_input only)"
            )
        labels = [_utf8(LABELS, v) for v in _bytes(inputs[LABELS])]
        score = gen_pb.ScoreRequest(model=model, text=prompt, labels=labels)
        return InferCall(score=score, outputs=_outputs(request, SCORE_OUTPUTS))
    stream = _flag(inputs, STREAM, default=False)
    exclude = _flag(inputs, EXCLUDE_INPUT, default=stream)
    if stream and not exclude:
        raise InvalidRequest(f"inputs[{EXCLUDE_INPUT}]", "must be true when streaming")
    generate = gen_pb.GenerateRequest(model=model, text=prompt)
    _fill_sampling(generate, _sampling(inputs, request.parameters))
    return InferCall(
        generate=generate,
        stream=stream,
        include_prompt=not exclude,
        outputs=_outputs(request, GENERATE_OUTPUTS),
    )


def _bytes(tensor: Tensor) -> tuple[bytes, ...]:
    return tuple(v for v in tensor.values if isinstance(v, bytes))


def _utf8(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"inputs[{name}]", f"is not valid UTF-8: {exc}") from None


def _one(inputs: Mapping[str, Tensor], name: str) -> bytes | bool:
    values = inputs[name].values
    if len(values) != 1:
        raise InvalidRequest(f"inputs[{name}]", f"must hold 1 element, got {len(values)}")
    return values[0]


def _text(inputs: Mapping[str, Tensor], name: str) -> str:
    if name not in inputs:
        raise InvalidRequest(f"inputs[{name}]", "is required")
    value = _one(inputs, name)
    return _utf8(name, value) if isinstance(value, bytes) else ""


def _flag(inputs: Mapping[str, Tensor], name: str, *, default: bool) -> bool:
    return bool(_one(inputs, name)) if name in inputs else default


def _outputs(request: pb.ModelInferRequest, allowed: Mapping[str, Any]) -> tuple[str, ...]:
    """The requested outputs (all of the signature's when none are named)."""
    names = tuple(o.name for o in request.outputs) or tuple(allowed)
    for name in names:
        if name not in allowed:
            raise InvalidRequest(
                f"outputs[{name}]", f"is not an output here (outputs: {', '.join(allowed)})"
            )
    return names


def _sampling(
    inputs: Mapping[str, Tensor], parameters: Mapping[str, pb.InferParameter]
) -> dict[str, Any]:
    """The sampling settings: the JSON tensor, else the request's parameters by those names."""
    if SAMPLING not in inputs:
        return {
            k: getattr(v, v.WhichOneof("parameter_choice") or "string_param")
            for k, v in parameters.items()
            if k in _SAMPLING_KEYS
        }
    field = f"inputs[{SAMPLING}]"
    raw = _one(inputs, SAMPLING)
    try:
        settings = json.loads(raw) if isinstance(raw, bytes) and raw.strip() else {}
    except ValueError as exc:
        raise InvalidRequest(field, f"is not JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise InvalidRequest(field, "must be a JSON object")
    unknown = sorted(set(settings) - set(_SAMPLING_KEYS))
    if unknown:
        raise InvalidRequest(
            f"{SAMPLING}.{unknown[0]}", f"is not supported (known: {', '.join(_SAMPLING_KEYS)})"
        )
    return settings


def _number(key: str, value: Any, *, integer: bool = False) -> Any:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise InvalidRequest(
            f"{SAMPLING}.{key}", f"must be {'an integer' if integer else 'a number'}"
        )
    return value


def _fill_sampling(req: gen_pb.GenerateRequest, s: Mapping[str, Any]) -> None:
    """vLLM's sampling settings onto slimserve's SamplingParams and StoppingCriteria."""
    if "max_tokens" in s:
        n = _number("max_tokens", s["max_tokens"], integer=True)
        if n < 1:
            raise InvalidRequest(f"{SAMPLING}.max_tokens", f"must be >= 1, got {n}")
        req.stopping.max_new_tokens = min(n, 2**32 - 1)
    temperature = _number("temperature", s.get("temperature", 1.0))
    req.sampling.do_sample = temperature != 0
    req.sampling.temperature = temperature
    if "top_p" in s:
        req.sampling.top_p = _number("top_p", s["top_p"])
    top_k = _number("top_k", s.get("top_k", 0), integer=True)
    if top_k < -1:
        raise InvalidRequest(f"{SAMPLING}.top_k", f"must be -1, 0 (no limit) or more, got {top_k}")
    req.sampling.top_k = max(top_k, 0)
    if "seed" in s:
        seed = _number("seed", s["seed"], integer=True)
        if not 0 <= seed < 2**64:
            raise InvalidRequest(f"{SAMPLING}.seed", f"must be in [0, 2**64), got {seed}")
        req.sampling.seed = seed
    if "repetition_penalty" in s:
        req.sampling.repetition_penalty = _number("repetition_penalty", s["repetition_penalty"])
    stop = s.get("stop", [])
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise InvalidRequest(f"{SAMPLING}.stop", "must be a string or a list of strings")
    req.stopping.stop_sequences.extend(stops)
    ignore_eos = s.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidRequest(f"{SAMPLING}.ignore_eos", "must be true or false")
    req.stopping.ignore_eos = ignore_eos
