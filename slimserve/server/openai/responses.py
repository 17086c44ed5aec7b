"""OpenAI response objects: completions, chat completions, their stream chunks, logprobs.

Plain dicts ready for `json.dumps`. Functions that name tokens (`tokens`, the logprob
builders) call the tokenizer and belong off the event loop for more than a chunk's worth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Scored:
    """One token with its log-probability (None: the first prompt token, which has no
    context) and its alternatives (None: not known, as for echoed prompt tokens)."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None = None

    @classmethod
    def generated(cls, lp: TokenLogprob) -> Scored:
        return cls(lp.token_id, lp.logprob, lp.top)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    rid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict[str, int] | None
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
    rid: str,
    model: str,
    created: int,
    *,
    text: str,
    logprobs: dict[str, Any] | None,
    finish: str | None,
    use: dict[str, int],
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": use,
    }


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict[str, str] | None,
    *,
    logprobs: dict[str, Any] | None = None,
    finish: str | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk`; `delta` None makes the usage chunk (no choices)."""
    choices = [] if delta is None else [
        {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    ]  # fmt: skip
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }


def tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's own text (a lone piece of a multi-byte character decodes to U+FFFD)."""
    return [tokenizer.decode([t]) for t in ids]


def completion_logprobs(tokenizer: Any, scored: Sequence[Scored], offset: int) -> dict[str, Any]:
    """The completions `logprobs` object; `offset` is the first token's place in the text."""
    texts = tokens(tokenizer, [s.token_id for s in scored])
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [s.logprob for s in scored],
        "top_logprobs": [_top_dict(tokenizer, s.top) for s in scored],
        "text_offset": offsets,
    }


def _top_dict(tokenizer: Any, top: tuple[tuple[int, float], ...] | None) -> dict[str, float] | None:
    if top is None:
        return None
    return dict(zip(tokens(tokenizer, [t for t, _ in top]), [v for _, v in top], strict=True))


def chat_logprobs(tokenizer: Any, scored: Sequence[Scored]) -> dict[str, Any]:
    """The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    content = []
    for s in scored:
        alternatives = [
            _chat_token(text, v)
            for text, (_, v) in zip(
                tokens(tokenizer, [t for t, _ in s.top or ()]), s.top or (), strict=True
            )
        ]
        entry = _chat_token(tokenizer.decode([s.token_id]), s.logprob)
        content.append({**entry, "top_logprobs": alternatives})
    return {"content": content}


def _chat_token(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
