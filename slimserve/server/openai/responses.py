"""OpenAI response objects: completions, chat completions, their stream chunks, logprobs.

Plain dicts ready for `json.dumps`. Token texts come with the log-probabilities, decoded in
the engine process (the server holds no tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slimserve.engine.types import StopReason, TokenLogprob

# DEADLINE never reaches a body (504 instead); CANCELLED only when the client is gone.
FINISH_REASONS: dict[StopReason, str] = {
    StopReason.EOS_TOKEN: "stop",
    StopReason.STOP_SEQUENCE: "stop",
    StopReason.MAX_TOKENS: "length",
    StopReason.TOKEN_LIMIT: "length",
    StopReason.TIME_LIMIT: "length",
    StopReason.CANCELLED: "abort",
    StopReason.DEADLINE: "length",
}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache supplied."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion(
    rid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = use
    return body


def completion_choice(
    index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat(
    rid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chat_choice(
    index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict[str, str] | None,
    *,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    finish: str | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk` of choice `index`; `delta` None makes the usage chunk (no
    choices)."""
    choices = [] if delta is None else [
        {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    ]  # fmt: skip
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }


def completion_logprobs(scored: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """The completions `logprobs` object; `offset` is the first token's place in the text.
    An echoed prompt's first token has no log-probability (null), and its alternatives
    are null too."""
    offsets = []
    for lp in scored:
        offsets.append(offset)
        offset += len(lp.text)
    return {
        "tokens": [lp.text for lp in scored],
        "token_logprobs": [lp.logprob for lp in scored],
        "top_logprobs": [
            None
            if lp.logprob is None
            else dict(zip(lp.top_text, (v for _, v in lp.top), strict=True))
            for lp in scored
        ],
        "text_offset": offsets,
    }


def chat_logprobs(scored: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    return {"content": [token_entry(lp) for lp in scored]}


def token_entry(lp: TokenLogprob) -> dict[str, Any]:
    """One token as chat and the Responses API list it, with its alternatives."""
    alternatives = [_chat_token(text, v) for text, (_, v) in zip(lp.top_text, lp.top, strict=True)]
    return {**_chat_token(lp.text, lp.logprob), "top_logprobs": alternatives}


def _chat_token(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
