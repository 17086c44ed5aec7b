"""What one engine step does, decided before it runs: a plain value a test can build.

The scheduler splits each step the way vLLM v1 does: `plan` says which sequences decode,
which prompt chunks are fed and how many tokens of Score work run; the engine executes the
plan (decode tokens and prompt chunks in one backend pass where the backend can), then
updates the sequences from the outputs. A long prompt is fed a chunk per step, beside
every running stream's next token, so no stream waits for a whole prompt (a 1,300-token
prompt froze every stream for seconds when prompts were prefilled whole between steps).

`StepBudget` sizes the chunks from what this machine measures, not from a constant: a step
should take about `max_step_ms`; the budget is the prompt tokens that fit beside the
decode tokens, learned from the steps the engine runs (a moving average of a decode step's
time and of a prompt token's). With nothing decoding, nobody waits, and a prompt is fed as
fast as the backend takes it. Imports nothing but the standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Chunk:
    """Prompt tokens [start, end) of one sequence fed this step; `last` when they finish
    its prompt (the step then gives its first token's logits)."""

    seq: Any
    start: int
    end: int
    last: bool

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step: the sequences that take a token, the prompt chunks fed beside them, and
    the tokens of Score work run before them."""

    decode: tuple[Any, ...] = ()
    chunks: tuple[Chunk, ...] = ()
    score_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return sum(c.size for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not (self.decode or self.chunks or self.score_tokens)


class StepBudget:
    """Prompt tokens a step may feed so that it takes about `max_step_ms` (module
    docstring). Worker thread only."""

    def __init__(
        self,
        max_step_ms: float,
        *,
        capacity: int,
        min_tokens: int = 16,
        first_guess_ms_per_token: float = 0.5,
        smoothing: float = 0.2,
    ) -> None:
        """`capacity`: the most tokens one backend step takes."""
        self.max_step_ms = max_step_ms
        self.capacity = capacity
        self.min_tokens = min(min_tokens, capacity)
        #: Moving averages: a decode step's milliseconds, and a prompt token's.
        self.decode_ms = 0.0
        self.token_ms = first_guess_ms_per_token
        self._smoothing = smoothing

    def tokens(self, decoding: int) -> int:
        """Prompt tokens for a step that also decodes `decoding` sequences."""
        if decoding == 0:
            return self.capacity  # no stream waits: feed as fast as the backend takes it
        room = max(0.0, self.max_step_ms - self.decode_ms) / max(self.token_ms, 1e-6)
        return int(min(self.capacity - decoding, max(self.min_tokens, room)))

    def observe(self, decoding: int, prompt_tokens: int, seconds: float) -> None:
        """Learn from a step that decoded `decoding` sequences and fed `prompt_tokens`."""
        ms = seconds * 1e3
        a = self._smoothing
        if prompt_tokens == 0:
            if decoding:
                self.decode_ms += a * (ms - self.decode_ms)
            return
        per_token = max(0.0, ms - (self.decode_ms if decoding else 0.0)) / prompt_tokens
        self.token_ms += a * (per_token - self.token_ms)


def plan(
    prefilling: Sequence[Any],
    decoding: Sequence[Any],
    *,
    budget: int,
    scores_waiting: bool,
    score_step_tokens: int,
) -> StepPlan:
    """The next step: every decoding sequence takes a token; `budget` prompt tokens go to
    Score work and to the prompts being fed, first come first served (each sequence's
    `fed` counts its prompt tokens already in the cache). Score and prompts share a
    contended budget half and half, so neither starves the other; Score work gets at
    least one chunk a step (`ScoreQueue` runs one even over budget)."""
    score = 0
    if scores_waiting:
        share = budget // 2 if prefilling else budget
        score = max(1, min(score_step_tokens, share))
        budget = max(0, budget - score) if prefilling else 0
    chunks = []
    for seq in prefilling:
        if budget <= 0:
            break
        total = len(seq.req.prompt_ids)
        take = min(total - seq.fed, budget)
        chunks.append(Chunk(seq, seq.fed, seq.fed + take, seq.fed + take == total))
        budget -= take
    return StepPlan(decode=tuple(decoding), chunks=tuple(chunks), score_tokens=score)
