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

Only the tensors' shapes and types are checked here; every rule a value must meet is the
door-neutral layer's (`server.generation`), and a refusal names the neutral field, which
`FIELDS` renders in this door's words.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimserve.engine.errors import InvalidRequest
from slimserve.engine.types import Guided, Prompt
from slimserve.server.generation import GenerateSpec, SamplingSpec, ScoreSpec
from slimserve.server.kserve.tensors import BOOL, BYTES, FP64, Tensor, decode_inputs
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

#: The sampling settings understood (vLLM's names, and its structured-output keys
#: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`); any other is refused,
#: not ignored.
_SAMPLING_KEYS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "ignore_eos",
    "repetition_penalty",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
_S = SAMPLING
#: Neutral field names (`server.generation`) in this door's words.
FIELDS = {
    "prompt": f"inputs[{TEXT_INPUT}]",
    "temperature": f"{_S}.temperature",
    "top_p": f"{_S}.top_p",
    "top_k": f"{_S}.top_k",
    "seed": f"{_S}.seed",
    "repetition_penalty": f"{_S}.repetition_penalty",
    "max_new_tokens": f"{_S}.max_tokens",
    "stop": f"{_S}.stop",
    "ignore_eos": f"{_S}.ignore_eos",
    "guided": f"{_S}.guided",
    "labels": f"inputs[{LABELS}]",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class InferCall:
    """A KServe request read: exactly one of `generate` and `score` is set."""

    generate: GenerateSpec | None = None
    score: ScoreSpec | None = None
    stream: bool = False
    #: Prepend the prompt to `text_output` (vLLM's `exclude_input_in_output` false).
    include_prompt: bool = False
    #: The outputs to return, in order.
    outputs: tuple[str, ...] = ()


def read_call(request: pb.ModelInferRequest, timeout_s: float | None = None) -> InferCall:
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
    model, ref = request.model_name, request.model_version
    prompt = Prompt(text=_text(inputs, TEXT_INPUT))
    if LABELS in inputs:
        extra = sorted(set(inputs) - {TEXT_INPUT, LABELS})
        if extra:
            raise InvalidRequest(
                f"inputs[{extra[0]}]", "cannot accompany labels (a Score takes text_input only)"
            )
        labels = tuple(_utf8(LABELS, v) for v in _bytes(inputs[LABELS]))
        score = ScoreSpec(model=model, ref=ref, prompt=prompt, labels=labels, timeout_s=timeout_s)
        return InferCall(score=score, outputs=_outputs(request, SCORE_OUTPUTS))
    stream = _flag(inputs, STREAM, default=False)
    exclude = _flag(inputs, EXCLUDE_INPUT, default=stream)
    if stream and not exclude:
        raise InvalidRequest(f"inputs[{EXCLUDE_INPUT}]", "must be true when streaming")
    settings = _sampling(inputs, request.parameters)
    generate = _generate_spec(settings, model, ref, prompt, timeout_s)
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


def _generate_spec(
    s: Mapping[str, Any], model: str, ref: str, prompt: Prompt, timeout_s: float | None
) -> GenerateSpec:
    """vLLM's sampling settings as a generation spec (vLLM's defaults: temperature 1.0
    samples, 0 is greedy; top_k 0 or -1 is no limit)."""
    n = s.get("max_tokens")
    if n is not None:
        n = _number("max_tokens", n, integer=True)
    temperature = _number("temperature", s.get("temperature", 1.0))
    top_k = _number("top_k", s.get("top_k", 0), integer=True)
    if top_k < -1:
        raise InvalidRequest(f"{SAMPLING}.top_k", f"must be -1, 0 (no limit) or more, got {top_k}")
    stop = s.get("stop", [])
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise InvalidRequest(f"{SAMPLING}.stop", "must be a string or a list of strings")
    ignore_eos = s.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidRequest(f"{SAMPLING}.ignore_eos", "must be true or false")
    return GenerateSpec(
        model=model,
        ref=ref,
        prompt=prompt,
        sampling=SamplingSpec(
            greedy=temperature == 0,
            temperature=temperature or None,
            top_k=max(top_k, 0),
            top_p=_number("top_p", s["top_p"]) if "top_p" in s else None,
            seed=_number("seed", s["seed"], integer=True) if "seed" in s else None,
            repetition_penalty=(
                _number("repetition_penalty", s["repetition_penalty"])
                if "repetition_penalty" in s
                else None
            ),
        ),
        max_new_tokens=n,
        stop=tuple(stops),
        ignore_eos=ignore_eos,
        guided=_guided(s),
        timeout_s=timeout_s,
    )


def _guided(s: Mapping[str, Any]) -> Guided | None:
    """vLLM's `guided_*` keys (one at most) as a structured-output request."""
    given = [
        k for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar") if k in s
    ]
    if len(given) > 1:
        raise InvalidRequest(f"{SAMPLING}.{given[1]}", f"cannot accompany {given[0]}")
    if not given:
        return None
    key = given[0]
    value = s[key]
    if key == "guided_json":
        if isinstance(value, str):
            return Guided("json_schema", value)
        if isinstance(value, dict | bool):
            return Guided("json_schema", json.dumps(value))
        raise InvalidRequest(f"{SAMPLING}.{key}", "must be a JSON schema (an object or its text)")
    if key == "guided_choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise InvalidRequest(f"{SAMPLING}.{key}", "must be a list of strings")
        return Guided("choice", choices=tuple(value))
    if not isinstance(value, str):
        raise InvalidRequest(f"{SAMPLING}.{key}", "must be a string")
    return Guided("regex" if key == "guided_regex" else "grammar", value)
