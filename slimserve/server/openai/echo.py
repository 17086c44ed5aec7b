"""Echoed prompt tokens' log-probabilities, from the engine's Score.

`engine.score(prompt, continuations)` returns each continuation's summed log-probability.
Scoring the first token as the prompt and every longer prefix of the rest as a
continuation (`ids[1:2]`, `ids[1:3]`, ..., `ids[1:]`) gives running sums, whose
differences are exactly each token's log-probability given the tokens before it. It puts
T(T-1)/2 tokens through the model for a T-token prompt, so it is bounded by the engine's
`max_score_tokens`; a longer echo is refused naming `echo`. Alternatives (top logprobs)
are not known for prompt tokens and are returned as null.
"""

from __future__ import annotations

import asyncio
import itertools

from slimserve.engine.errors import InvalidRequest
from slimserve.engine.loader import LoadedModel
from slimserve.server.openai.responses import Scored


def echo_cost(tokens: int) -> int:
    """Tokens of forward passes the prefix scoring of a `tokens`-token prompt costs."""
    return tokens * (tokens - 1) // 2


class EchoScorer:
    def __init__(self, max_score_tokens: int) -> None:
        self.max_score_tokens = max_score_tokens

    async def logprobs(self, model: LoadedModel, ids: tuple[int, ...]) -> list[Scored]:
        """Each prompt token with its log-probability given the ones before (the first
        token has none). Raises InvalidRequest("echo") over `max_score_tokens`, and what
        `engine.score` raises (Overloaded, NotReady)."""
        cost = echo_cost(len(ids))
        if cost > self.max_score_tokens:
            raise InvalidRequest(
                "echo",
                f"the log-probabilities of a {len(ids)}-token prompt take {cost} tokens of "
                f"scoring (T(T-1)/2); the limit is max_score_tokens={self.max_score_tokens}: "
                "send a shorter prompt, or echo without logprobs",
            )
        first = Scored(ids[0], None)
        if len(ids) == 1:
            return [first]
        prefixes = [list(ids[1:k]) for k in range(2, len(ids) + 1)]
        sums = await asyncio.wrap_future(model.engine.score(list(ids[:1]), prefixes, None))
        steps = [sums[0], *(b - a for a, b in itertools.pairwise(sums))]
        return [first, *(Scored(t, lp) for t, lp in zip(ids[1:], steps, strict=True))]
