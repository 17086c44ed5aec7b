"""OpenAI's Responses API objects (`POST /v1/responses`), stateless.

A response has one output item, an assistant message with one `output_text` part. Streaming
sends the events the SDKs read, in order: `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, one
`response.output_text.delta` per text delta, `response.output_text.done`,
`response.content_part.done`, `response.output_item.done`, then `response.completed` (or
`response.incomplete` when the token budget cut it), each with a `sequence_number`. Plain
dicts ready for `json.dumps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimserve.engine.types import TokenLogprob
from slimserve.server.openai.responses import token_entry


@dataclass(slots=True)
class ResponseState:
    """One response while it is built: its ids, text so far and event numbering."""

    rid: str
    model: str
    created: int
    params: dict[str, Any]
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sequence: int = 0

    @property
    def id(self) -> str:
        return f"resp_{self.rid}"

    @property
    def item_id(self) -> str:
        return f"msg_{self.rid}"

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return body

    def part(self, done: bool) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": self.text if done else ""}
        part["annotations"] = []
        if self.params.get("top_logprobs"):
            part["logprobs"] = [token_entry(lp) for lp in self.logprobs] if done else []
        return part

    def message(self, status: str) -> dict[str, Any]:
        done = status != "in_progress"
        return {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [self.part(done)] if done else [],
        }

    def response(
        self,
        status: str,
        *,
        usage: dict[str, Any] | None = None,
        incomplete: str | None = None,
    ) -> dict[str, Any]:
        """The response object; `status` in_progress, completed or incomplete."""
        done = status != "in_progress"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": [self.message(status)] if done else [],
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "usage": usage,
            **self.params,
        }


def usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }
