"""What the scheduler keeps per request: a generation's state and a Score job's progress.

A `Sequence` moves WAITING -> RUNNING -> FINISHED, and its state says where it is (no
membership in a list or a sentinel slot stands for it). A `ScoreJob` is scored a chunk of
continuations at a time, so one large Score never holds every stream for its whole
length. Imports engine modules and torch only.
"""

from __future__ import annotations

import concurrent.futures
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from slimserve.engine.sampling import make_generator
from slimserve.engine.spec_policy import Acceptance
from slimserve.engine.text import Decoder, IncrementalDetokenizer, StopMatcher
from slimserve.engine.types import Event, GenerationRequest, StopReason, TokenLogprob

if TYPE_CHECKING:
    import torch

    from slimserve.engine.prefix import Placement
    from slimserve.engine.scheduler import Engine

Sink = Callable[[Event], None]


class Constraint(Protocol):
    """A sequence's structured-output state (`structured.Matcher`), as the scheduler
    uses it: which tokens may come next, and following the tokens taken."""

    @property
    def vocab_size(self) -> int: ...

    def mask_logits_(self, logits: torch.Tensor) -> None: ...

    def fill_draft_bitmasks(self, draft: Any, bitmask: torch.Tensor, row: int = 0) -> int: ...

    def validate(self, tokens: Any) -> int: ...

    def accept(self, token_id: int) -> bool: ...

    @property
    def is_terminated(self) -> bool: ...

    @property
    def error(self) -> str | None: ...


class SeqState(enum.Enum):
    WAITING = "waiting"  # queued, no slot
    RUNNING = "running"  # holds a slot, decoding
    FINISHED = "finished"  # its last event was sent; slot released


class Handle:
    """The submitter's side of a running request."""

    __slots__ = ("_engine", "cancelled", "request_id")

    def __init__(self, engine: Engine, request_id: str) -> None:
        self._engine = engine
        self.request_id = request_id
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the request at the engine's next step (a final CANCELLED event follows)."""
        self.cancelled = True
        self._engine.wake()


class Sequence:
    """A request while it waits or runs; touched only by the worker thread once admitted."""

    __slots__ = (
        "cached",
        "detok",
        "draft_accepted",
        "draft_proposed",
        "fed",
        "generated",
        "generator",
        "handle",
        "last_token",
        "matcher",
        "placement",
        "prefill_ms",
        "prompt_array",
        "req",
        "reserved",
        "sink",
        "slot",
        "spec",
        "state",
        "stops",
        "t_admit",
        "t_arrival",
        "t_first",
        "t_last",
        "tokens",
    )

    def __init__(
        self,
        req: GenerationRequest,
        sink: Sink,
        handle: Handle,
        tok: Decoder,
        matcher: Constraint | None = None,
    ) -> None:
        self.req = req
        #: Structured output: the grammar's state (None: free text).
        self.matcher = matcher
        self.sink = sink
        self.handle = handle
        self.state = SeqState.WAITING
        #: The KV-cache slot while RUNNING.
        self.slot: int | None = None
        #: Cache cells held for it in a shared pool while RUNNING (see Engine._reservation).
        self.reserved = 0
        #: Prompt tokens in its cache so far (chunked prefill: fed a chunk a step).
        self.fed = 0
        #: Prompt tokens it started with from the prefix cache, and where they come from
        #: (`prefix.Placement`, set at admission until the worker applies it).
        self.cached = 0
        self.placement: Placement | None = None
        #: The prompt as an array, made once by the prefix cache when it compares prompts.
        self.prompt_array: Any = None
        self.generated: list[int] = []
        #: The prompt and every generated token (what a drafter looks back on).
        self.tokens: list[int] = list(req.prompt_ids)
        self.last_token = -1
        self.detok = IncrementalDetokenizer(tok, req.prompt_ids)
        self.stops = StopMatcher(req.stopping.stop_sequences)
        self.generator = make_generator(req.sampling)
        self.t_arrival = time.monotonic()
        self.t_admit = self.t_first = self.t_last = 0.0
        self.prefill_ms = 0.0
        self.draft_proposed = self.draft_accepted = 0
        #: How often its drafts are accepted (`spec_policy`; used only with a drafter).
        self.spec = Acceptance()

    def expired_reason(self, now: float) -> StopReason | None:
        """Why the request must stop now, if it must: cancelled, deadline or time limit."""
        # The deadline first: when it passes, gRPC also cancels the call, and the reason
        # that ended the request is the deadline.
        if self.req.deadline is not None and now >= self.req.deadline:
            return StopReason.DEADLINE
        if self.handle.cancelled:
            return StopReason.CANCELLED
        limit = self.req.stopping.time_limit_s
        if limit is not None and now - self.t_arrival >= limit:
            return StopReason.TIME_LIMIT
        return None


@dataclass(eq=False, slots=True, kw_only=True)
class ScoreJob:
    """One Score call: a prompt, its continuations, and the sums found so far."""

    prompt: list[int]
    continuations: list[list[int]]
    future: concurrent.futures.Future[Any]
    #: Not None: the job asks for each prompt token's log-probability and this many top
    #: alternatives (`Backend.prompt_logprobs`, in parts where the backend can: `fed`
    #: counts the prompt tokens put through); `continuations` is then unused.
    top_n: int | None = None
    #: time.monotonic() after which the job fails with DeadlineExpired; None = none.
    deadline: float | None = None
    #: Index of the first continuation not yet scored.
    next: int = 0
    sums: list[float] = field(default_factory=list)
    #: Prompt tokens put through so far (a prompt-logprob job's, or a held Score prompt's),
    #: and a prompt-logprob job's entries.
    fed: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: Whether the backend holds prompt[:-1] (fed in parts, `fed` of them so far) and each
    #: label then costs only its own tokens; None until the score queue decides.
    held: bool | None = None

    def cost(self, i: int, held: int = 0) -> int:
        """Tokens continuation `i` puts through the model: prompt + continuation - 1, less
        the `held` prompt tokens the backend already has."""
        return len(self.prompt) + len(self.continuations[i]) - 1 - held

    @property
    def total_cost(self) -> int:
        return sum(self.cost(i) for i in range(len(self.continuations)))

    @property
    def done(self) -> bool:
        if self.top_n is not None:
            return self.fed >= len(self.prompt)
        return self.next >= len(self.continuations)

    def take(self, budget: int, held: int = 0) -> tuple[int, int, int]:
        """The next continuations that fit `budget` tokens (at least one): a [start, end)
        and the tokens they put through. A continuation whose input row (prompt +
        continuation[:-1]) an earlier one in the range already has costs nothing: the
        backend runs identical rows once (`ScorePlan`), so 32 one-token labels cost one
        prompt, and the step budget learns from the tokens that really ran. `held`: prompt
        tokens the backend holds, which no row puts through again."""
        start = end = self.next
        spent = 0
        rows: set[tuple[int, ...]] = set()
        while end < len(self.continuations):
            row = tuple(self.continuations[end][:-1])
            cost = 0 if row in rows else self.cost(end, held)
            if end > start and spent + cost > budget:
                break
            rows.add(row)
            spent += cost
            end += 1
        self.next = end
        return start, end, spent
