"""Answering a `concurrent.futures.Future` that its caller may cancel at any moment."""

from __future__ import annotations

import concurrent.futures
from typing import Any


def settle(
    future: concurrent.futures.Future[Any], result: Any = None, *, exc: BaseException | None = None
) -> bool:
    """Set `future`'s result (or `exc`) unless it is already done; False when it was.

    A caller that gives up (a deadline, a disconnect) cancels its future from another
    thread, so "done?" then "set" can race: the set is tried, and the `InvalidStateError`
    of a future cancelled in between means the same as finding it done. Never raises it
    into the thread that answers (an engine loop, a pipe reader).
    """
    try:
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
    except concurrent.futures.InvalidStateError:
        return False
    return True
