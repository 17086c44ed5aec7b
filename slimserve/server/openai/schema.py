"""OpenAI request bodies -> the door-neutral `GenerateSpec`, every field's JSON type checked.

Only the body's shape is read here (which fields, their JSON types, OpenAI's defaults:
`temperature` is 1.0 when absent and 0 means greedy); every rule a value must meet is
`server.generation.validate`'s, and a refusal names the neutral field, which
`OpenAIRequest.fields` renders as the field the caller sent (`max_tokens`,
`messages[2].role`, `response_format`).

No silent drops: a field this door does not know is refused by name (as OpenAI's own API
does: "unrecognized request argument"), and a field it knows but cannot honour (`tools`,
penalties, `logit_bias`, ...) is refused unless left at its neutral value. `top_k`, `seed`,
`repetition_penalty`, `ignore_eos` and the structured-output keys `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` are taken as vLLM takes them (extra body
fields); `response_format` as OpenAI defines it (`text`, `json_object`, `json_schema`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from slimserve.engine.errors import InvalidRequest
from slimserve.engine.types import Guided, Message, Prompt
from slimserve.registry.errors import RegistryError
from slimserve.registry.store import parse_model_ref
from slimserve.server.generation import GenerateSpec, SamplingSpec

Kind = Literal["completion", "chat", "responses"]

#: Prompts one completions request may batch (each is one choice, or `n`).
MAX_PROMPTS = 32
#: OpenAI roles -> the roles the chat template takes.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: Fields accepted only at their neutral value: anything else is refused by name.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "store": (None, False),
    "modalities": (None, ["text"]),
    "previous_response_id": (None,),
    "truncation": (None, "disabled"),
    "include": (None, []),
    "reasoning": (None,),
    "reasoning_effort": (None,),
    "prediction": (None,),
    "audio": (None,),
}
#: Fields that say who asks, not what: accepted and not used.
_METADATA = ("user", "metadata", "service_tier")
_SAMPLING = ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "ignore_eos", "stop")
_GUIDED = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
_COMMON = ("model", "n", "stream", "stream_options", *_SAMPLING, *_GUIDED, *_METADATA)
#: Every field each route reads.
_COMPLETION = ("prompt", "max_tokens", "echo", "logprobs")
_CHAT = ("messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs")
_RESPONSES = ("input", "instructions", "max_output_tokens", "text", "top_logprobs")
KNOWN: dict[Kind, frozenset[str]] = {
    "completion": frozenset((*_COMMON, *_COMPLETION, *_NEUTRAL)),
    "chat": frozenset((*_COMMON, *_CHAT, *_NEUTRAL)),
    "responses": frozenset((*_COMMON, *_RESPONSES, *_NEUTRAL)),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenAIRequest:
    """A checked `/v1/completions`, `/v1/chat/completions` or `/v1/responses` body."""

    kind: Kind
    #: One generation per prompt (completions may batch several; each asks for `n`).
    specs: tuple[GenerateSpec, ...]
    #: False only for an echo with `max_tokens: 0` (score the prompt, generate nothing).
    generate: bool = True
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    #: Whether token log-probabilities are returned, and how many alternatives each.
    logprobs: bool = False
    top_logprobs: int = 0
    #: The body fields that asked for the token budget and for structured output.
    max_key: str = "max_tokens"
    guided_key: str = "response_format"
    #: The response_format's JSON schema name (`json_schema.name`), if one was given.
    schema_name: str = ""

    @property
    def fields(self) -> dict[str, str]:
        """Neutral field names (`server.generation`) in this request's words."""
        prompt = {"completion": "prompt", "chat": "messages", "responses": "input"}[self.kind]
        top = "logprobs" if self.kind == "completion" else "top_logprobs"
        return {
            "prompt": prompt,
            "prompt.text": prompt,
            "prompt.messages": prompt,
            "prompt.ids": prompt,
            "max_new_tokens": self.max_key,
            "top_n": top,
            "guided": self.guided_key,
            "labels": "echo",
        }


def parse(body: object, kind: Kind) -> OpenAIRequest:
    """Check an OpenAI body; raises InvalidRequest naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    for key in body:
        if key not in KNOWN[kind]:
            raise InvalidRequest(key, "is not a field this server knows (unrecognized)")
    for key, allowed in _NEUTRAL.items():
        if body.get(key) not in allowed:
            hint = f"send {allowed[1]!r} or leave it out" if len(allowed) > 1 else "leave it out"
            raise InvalidRequest(key, f"is not supported ({hint})")
    name, ref = model_ref(_typed(body, "model", str, ""))
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise InvalidRequest("stream_options", "is only allowed with stream: true")
    include_usage = _typed(options or {}, "include_usage", bool, False, "stream_options.")
    logprobs, top = _logprobs(body, kind)
    max_key, max_tokens = _max_tokens(body, kind)
    guided_key, guided, schema_name = _guided(body)
    n = _typed(body, "n", int, 1)
    base: dict[str, Any] = dict(
        model=name,
        ref=ref,
        sampling=_sampling(body),
        max_new_tokens=max_tokens or None,
        stop=_stop(body),
        ignore_eos=_typed(body, "ignore_eos", bool, False),
        logprobs=logprobs,
        top_n=top,
        guided=guided,
        n=n,
    )
    common: dict[str, Any] = dict(
        kind=kind,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top,
        max_key=max_key,
        guided_key=guided_key,
        schema_name=schema_name,
    )
    if kind != "completion":
        if max_tokens == 0:
            raise InvalidRequest(max_key, "must be >= 1")
        prompt = _messages(body) if kind == "chat" else _input(body)
        return OpenAIRequest(**common, specs=(GenerateSpec(prompt=prompt, **base),))
    echo = _typed(body, "echo", bool, False)
    if max_tokens == 0 and not echo:
        raise InvalidRequest("max_tokens", "must be >= 1 (0 only with echo: true)")
    prompts = _prompts(body)
    if stream and len(prompts) > 1:
        raise InvalidRequest("prompt", "a streamed request takes one prompt")
    specs = tuple(GenerateSpec(prompt=p, echo=echo, **base) for p in prompts)
    return OpenAIRequest(**common, specs=specs, echo=echo, generate=max_tokens != 0)


def _typed(
    body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any, prefix: str = ""
) -> Any:
    value = body.get(key)
    if value is None:
        return default
    # bool is an int to Python, never to a JSON schema.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise InvalidRequest(prefix + key, f"must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise InvalidRequest(prefix + key, f"must be {_kind_name(kind)}, got {_short(value)}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _number(body: Mapping[str, Any], key: str) -> float | None:
    """A JSON number as a float; an integer too large for a float is refused by name."""
    value = _typed(body, key, (int, float), None)
    if value is None:
        return None
    try:
        return float(value)
    except OverflowError:
        raise InvalidRequest(key, "is too large a number") from None


def model_ref(text: str) -> tuple[str, str]:
    """`model` (name, name@version or name@alias) as (name, ref); InvalidRequest if bad."""
    if not text:
        raise InvalidRequest("model", "is required: name, name@version or name@alias")
    try:
        return parse_model_ref(text)
    except RegistryError as exc:
        raise InvalidRequest("model", str(exc)) from exc


def _sampling(body: Mapping[str, Any]) -> SamplingSpec:
    temperature = _number(body, "temperature")
    top_k = _typed(body, "top_k", int, 0)
    if top_k < -1:
        raise InvalidRequest("top_k", f"must be -1 or 0 (off) or a positive count, got {top_k}")
    return SamplingSpec(
        greedy=temperature == 0,
        temperature=temperature or None,  # absent: OpenAI's 1.0
        top_k=max(top_k, 0),
        top_p=_number(body, "top_p"),
        seed=_typed(body, "seed", int, None),
        repetition_penalty=_number(body, "repetition_penalty"),
    )


def _max_tokens(body: Mapping[str, Any], kind: Kind) -> tuple[str, int | None]:
    """The field that names the token budget, and its value (None: the default)."""
    key = {"completion": "max_tokens", "chat": "max_tokens", "responses": "max_output_tokens"}[kind]
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        key = "max_completion_tokens"
    n = _typed(body, key, int, None)
    if n is not None and n < 0:
        raise InvalidRequest(key, f"must be >= 1, got {n}")
    return key, n


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InvalidRequest("stop", "must be a string or a list of strings")
    return tuple(stop or ())


def _logprobs(body: Mapping[str, Any], kind: Kind) -> tuple[bool, int]:
    if kind == "completion":
        top = _typed(body, "logprobs", int, None)
        return top is not None, top or 0
    top = _typed(body, "top_logprobs", int, 0)
    wanted = top > 0 if kind == "responses" else _typed(body, "logprobs", bool, False)
    if top and not wanted:
        raise InvalidRequest("top_logprobs", "needs logprobs: true")
    return wanted, top


def _guided(body: Mapping[str, Any]) -> tuple[str, Guided | None, str]:
    """(the field that asked, the structured-output request, the schema's name)."""
    given = [k for k in _GUIDED if body.get(k) is not None]
    text = body.get("text")
    if isinstance(text, dict) and text.get("format") is not None:
        given.append("text.format")
    if len(given) > 1:
        raise InvalidRequest(given[1], f"cannot accompany {given[0]}")
    if not given:
        return "response_format", None, ""
    key = given[0]
    if key in ("response_format", "text.format"):
        fmt = body["response_format"] if key == "response_format" else text["format"]  # type: ignore[index]
        guided, name = _response_format(key, fmt)
        return key, guided, name
    value = body[key]
    if key == "guided_json":
        if isinstance(value, str):
            return key, Guided("json_schema", value), ""
        if isinstance(value, dict):
            return key, Guided("json_schema", json.dumps(value)), ""
        raise InvalidRequest(key, "must be a JSON schema (an object or its text)")
    if key == "guided_choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise InvalidRequest(key, "must be a list of strings")
        return key, Guided("choice", choices=tuple(value)), ""
    if not isinstance(value, str):
        raise InvalidRequest(key, "must be a string")
    return key, Guided("regex" if key == "guided_regex" else "grammar", value), ""


def _response_format(key: str, fmt: object) -> tuple[Guided | None, str]:
    """OpenAI's `response_format` (chat, completions) or `text.format` (responses)."""
    if not isinstance(fmt, dict):
        raise InvalidRequest(key, "must be an object with a type")
    kind = fmt.get("type")
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return Guided("json_object"), ""
    if kind != "json_schema":
        raise InvalidRequest(f"{key}.type", "must be text, json_object or json_schema")
    # Chat and completions nest the schema in `json_schema`; the Responses API does not.
    spec = fmt.get("json_schema") if key == "response_format" else fmt
    where = f"{key}.json_schema" if key == "response_format" else key
    if not isinstance(spec, dict):
        raise InvalidRequest(where, "must be an object with a schema")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where}.schema", "must be a JSON schema object")
    name = spec.get("name", "")
    if not isinstance(name, str):
        raise InvalidRequest(f"{where}.name", "must be a string")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequest(f"{where}.strict", "must be true or false")
    # The output is held to the schema either way; `strict: false` leaves objects open to
    # properties the schema does not list, as JSON Schema does.
    return Guided("json_schema", json.dumps(schema), strict=strict is not False), name


def _messages(body: Mapping[str, Any]) -> Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    return Prompt(messages=tuple(_message(m, f"messages[{i}]") for i, m in enumerate(messages)))


def _message(m: object, where: str) -> Message:
    if not isinstance(m, dict):
        raise InvalidRequest(where, "must be an object with role and content")
    role = m.get("role")
    if role not in _ROLES:
        raise InvalidRequest(
            f"{where}.role", f"must be system, developer, user or assistant, got {_short(role)}"
        )
    return Message(_ROLES[role], _content(m.get("content"), f"{where}.content"))


def _input(body: Mapping[str, Any]) -> Prompt:
    """The Responses API's `input` (text, or messages) with `instructions` first."""
    instructions = _typed(body, "instructions", str, None)
    given = body.get("input")
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    elif not isinstance(given, list) or not given:
        raise InvalidRequest("input", "must be text or a non-empty list of messages")
    messages = [_message(m, f"input[{i}]") for i, m in enumerate(given)]
    if instructions is not None:
        messages.insert(0, Message("system", instructions))
    return Prompt(messages=tuple(messages))


def _content(content: object, where: str) -> str:
    """A message's text: a string, or a list of text parts (`text`, `input_text` or
    `output_text`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(where, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not (
            isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text")
        ):
            raise InvalidRequest(f"{where}[{j}]", "only text parts are supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}[{j}].text", "must be a string")
        texts.append(text)
    return "".join(texts)


def _prompts(body: Mapping[str, Any]) -> tuple[Prompt, ...]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return (Prompt(text=prompt),)
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest("prompt", "must be a string, token ids, or a non-empty list of them")
    if all(_is_id(t) for t in prompt):
        return (Prompt(ids=tuple(prompt)),)
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequest("prompt", f"at most {MAX_PROMPTS} prompts, got {len(prompt)}")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append(Prompt(text=p))
        elif isinstance(p, list) and p and all(_is_id(t) for t in p):
            out.append(Prompt(ids=tuple(p)))
        else:
            raise InvalidRequest(f"prompt[{i}]", "must be a string or a non-empty list of ids")
    return tuple(out)


def _is_id(value: object) -> bool:
    """A token id: a JSON integer (a negative or huge one is refused by the engine)."""
    return isinstance(value, int) and not isinstance(value, bool)
