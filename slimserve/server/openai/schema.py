"""OpenAI request bodies -> the gRPC door's `GenerateRequest`, every field checked by name.

A body becomes the same protobuf request the gRPC door takes, so `convert` validates
sampling, stopping and chat templating once for both doors; `openai_param` renames the
fields `convert` names (`sampling.temperature`) to the ones the caller sent
(`temperature`). Fields this door cannot honour (`n` > 1, penalties, tools, ...) are
refused by name rather than ignored; fields it does not know are ignored, as OpenAI does.

Sampling follows OpenAI, not the gRPC default: `temperature` is 1.0 when absent, and 0
means greedy. `top_k`, `seed`, `repetition_penalty` and `ignore_eos` are taken as vLLM
takes them (extra body fields; `top_k` -1 or 0 means off).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from slimserve.engine.errors import InvalidRequest
from slimserve.registry.errors import RegistryError
from slimserve.registry.store import parse_model_ref
from slimserve.v1 import generation_pb2 as gen_pb

Kind = Literal["completion", "chat"]

#: Prompts one completions request may batch (each is one choice).
MAX_PROMPTS = 32
_UINT32 = 2**32 - 1
#: OpenAI roles -> the roles the chat template takes.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: Fields accepted only at their neutral value: anything else is refused by name.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Prompt:
    """One completions prompt: text, or token ids (checked against the model later)."""

    text: str | None = None
    ids: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenAIRequest:
    """A checked `/v1/completions` or `/v1/chat/completions` body."""

    kind: Kind
    #: The `model` field as sent, split into registry name and ref ('' = the loaded one).
    name: str
    ref: str
    #: Sampling, stopping, response options, the model ref and (chat) the messages.
    template: gen_pb.GenerateRequest
    #: Completions: one or more prompts; chat: ().
    prompts: tuple[Prompt, ...] = ()
    #: False only for an echo with `max_tokens: 0` (score the prompt, generate nothing).
    generate: bool = True
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    #: Whether token log-probabilities are returned, and how many alternatives each.
    logprobs: bool = False
    top_logprobs: int = 0

    def with_prompt(self, prompt: Prompt) -> gen_pb.GenerateRequest:
        """The template with one completions prompt's text as its input."""
        pb = gen_pb.GenerateRequest()
        pb.CopyFrom(self.template)
        if prompt.text is not None:
            pb.text = prompt.text
        return pb


def openai_param(field: str, kind: Kind) -> str:
    """The request field a `convert` field name stands for in an OpenAI body."""
    logprobs = "top_logprobs" if kind == "chat" else "logprobs"
    renames = {
        "text": "prompt",
        "input": "prompt" if kind == "completion" else "messages",
        "chat": "messages",
        "chat.messages": "messages",
        "sampling.temperature": "temperature",
        "sampling.top_p": "top_p",
        "sampling.repetition_penalty": "repetition_penalty",
        "stopping.max_new_tokens": "max_tokens",
        "stopping.stop_sequences": "stop",
        "response.top_n": logprobs,
        "labels": "echo",  # the engine's refusal of an echo's scoring work
    }
    for old, new in renames.items():
        if field == old or field.startswith((f"{old}[", f"{old}.")):
            return new + field[len(old) :]
    return field


def renamed(exc: InvalidRequest, kind: Kind) -> InvalidRequest:
    """`exc` naming the OpenAI field instead of the protobuf one."""
    message = str(exc).removeprefix(f"{exc.field}: ")
    return InvalidRequest(openai_param(exc.field, kind), message)


def parse(body: object, kind: Kind, *, max_top_logprobs: int) -> OpenAIRequest:
    """Check an OpenAI body; raises InvalidRequest naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    for key, allowed in _NEUTRAL.items():
        if body.get(key) not in allowed:
            raise InvalidRequest(key, f"is not supported (send {allowed[1]!r} or leave it out)")
    name, ref = model_ref(_typed(body, "model", str, ""))
    template = gen_pb.GenerateRequest(model=gen_pb.ModelRef(name=name, ref=ref))
    _sampling(body, template)
    generate = _stopping(body, template, kind)
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise InvalidRequest("stream_options", "is only allowed with stream: true")
    include_usage = _typed(options or {}, "include_usage", bool, False, "stream_options.")
    logprobs, top = _logprobs(body, kind, max_top_logprobs)
    template.response.logprobs = logprobs
    template.response.top_n = top
    common: dict[str, Any] = dict(
        kind=kind,
        name=name,
        ref=ref,
        template=template,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top,
    )
    if kind == "chat":
        if not generate:
            raise InvalidRequest("max_tokens", "must be >= 1")
        _messages(body, template)
        return OpenAIRequest(**common)
    echo = _typed(body, "echo", bool, False)
    if not generate and not echo:
        raise InvalidRequest("max_tokens", "must be >= 1 (0 only with echo: true)")
    prompts = _prompts(body)
    if stream and len(prompts) > 1:
        raise InvalidRequest("prompt", "a streamed request takes one prompt")
    return OpenAIRequest(**common, prompts=prompts, echo=echo, generate=generate)


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
        raise InvalidRequest(prefix + key, f"must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def model_ref(text: str) -> tuple[str, str]:
    """`model` (name, name@version or name@alias) as (name, ref); InvalidRequest if bad."""
    if not text:
        raise InvalidRequest("model", "is required: name, name@version or name@alias")
    try:
        return parse_model_ref(text)
    except RegistryError as exc:
        raise InvalidRequest("model", str(exc)) from exc


def _sampling(body: Mapping[str, Any], pb: gen_pb.GenerateRequest) -> None:
    s = pb.sampling
    temperature = float(_typed(body, "temperature", (int, float), 1.0))
    s.do_sample = temperature != 0
    s.temperature = temperature  # 0 is greedy; convert refuses a negative or tiny one
    s.top_p = float(_typed(body, "top_p", (int, float), 1.0))
    top_k = _typed(body, "top_k", int, 0)
    if not -1 <= top_k <= _UINT32:
        raise InvalidRequest("top_k", f"must be -1 or 0 (off) or a positive count, got {top_k}")
    s.top_k = max(top_k, 0)
    seed = _typed(body, "seed", int, None)
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise InvalidRequest("seed", f"must be in 0..2^64-1, got {seed}")
        s.seed = seed
    s.repetition_penalty = float(_typed(body, "repetition_penalty", (int, float), 0.0))


def _stopping(body: Mapping[str, Any], pb: gen_pb.GenerateRequest, kind: Kind) -> bool:
    """Fill `pb.stopping`; False when `max_tokens` is 0 (nothing to generate)."""
    key = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        key = "max_completion_tokens"
    n = _typed(body, key, int, None)
    if n is not None and not 0 <= n <= _UINT32:
        raise InvalidRequest(key, f"must be >= 1, got {n}")
    pb.stopping.max_new_tokens = n or 0
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InvalidRequest("stop", "must be a string or a list of strings")
    pb.stopping.stop_sequences.extend(stop or [])
    pb.stopping.ignore_eos = _typed(body, "ignore_eos", bool, False)
    return bool(n != 0)


def _logprobs(body: Mapping[str, Any], kind: Kind, limit: int) -> tuple[bool, int]:
    if kind == "chat":
        wanted = _typed(body, "logprobs", bool, False)
        top = _typed(body, "top_logprobs", int, 0)
        if top and not wanted:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        key = "top_logprobs"
    else:
        top = _typed(body, "logprobs", int, None)
        wanted = top is not None
        top = top or 0
        key = "logprobs"
    if not 0 <= top <= limit:
        raise InvalidRequest(key, f"must be 0..{limit} (limit max_top_n), got {top}")
    return wanted, top


def _messages(body: Mapping[str, Any], pb: gen_pb.GenerateRequest) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(where, "must be an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"{where}.role", f"must be system, developer, user or assistant, got {role!r}"
            )
        content = _content(m.get("content"), f"{where}.content")
        pb.chat.messages.append(gen_pb.ChatMessage(role=_ROLES[role], content=content))


def _content(content: object, where: str) -> str:
    """A message's text: a string, or a list of `{"type": "text", "text": ...}` parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(where, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text"):
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
    if all(_is_int(t) for t in prompt):
        return (Prompt(ids=tuple(prompt)),)
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequest("prompt", f"at most {MAX_PROMPTS} prompts, got {len(prompt)}")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append(Prompt(text=p))
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            out.append(Prompt(ids=tuple(p)))
        else:
            raise InvalidRequest(f"prompt[{i}]", "must be a string or a non-empty list of ids")
    return tuple(out)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
