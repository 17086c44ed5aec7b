"""Server-sent events: the `data:` lines and a response that knows how it ended.

`EventStream` sends an async iterator of SSE lines and watches the connection meanwhile:
when the client goes away the iterator is closed at once (its `finally` cancels the
engine request, freeing the slot) instead of at the next token it would fail to send.
However it ends, `on_close` hears the status the access log records.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"
#: The access log's status for a client that closed the connection first (nginx's).
CLIENT_GONE = 499


def event(obj: Mapping[str, Any]) -> str:
    """One SSE event holding `obj` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass(slots=True)
class Outcome:
    """How a stream ended, for the access log: 200, an error's status once sent, or 499."""

    status: int = 200


class EventStream(StreamingResponse):
    """A `text/event-stream` response of `events`; `on_close(status)` runs exactly once."""

    def __init__(
        self,
        events: AsyncGenerator[str, None],
        outcome: Outcome,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        sse_headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        super().__init__(
            events, media_type="text/event-stream", headers={**sse_headers, **(headers or {})}
        )
        self._events = events
        self.outcome = outcome
        self.on_close: Callable[[int], None] = lambda _status: None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
            if sending in done and sending.exception() is None:
                return
            self.outcome.status = CLIENT_GONE
            if sending in done and not isinstance(sending.exception(), OSError):
                sending.result()  # a bug, not a client that left: let it be seen
        finally:
            for task in (sending, gone):
                task.cancel()
            await asyncio.gather(sending, gone, return_exceptions=True)
            await self._events.aclose()  # a generator never started or left mid-way
            self.on_close(self.outcome.status)
