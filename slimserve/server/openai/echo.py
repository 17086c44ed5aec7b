"""Echoed prompt tokens' log-probabilities and their top alternatives.

One forward over the prompt in the engine (`engine.prompt_logprobs`, run between decode
steps like a Score): each token after the first gets its log-probability given the tokens
before it and the `top_logprobs` most likely tokens at its position, which is what
lm-eval's loglikelihood requests read (the log-probability and whether the token was the
greedy choice). A prompt longer than the engine's `max_score_tokens` (or its context) is
refused naming `echo`.
"""

from __future__ import annotations

import asyncio

from slimserve.engine.errors import InvalidRequest
from slimserve.engine.loader import LoadedModel
from slimserve.server.openai.responses import Scored


def echo_cost(tokens: int) -> int:
    """Tokens of forward passes the prompt log-probabilities of a `tokens`-token prompt cost."""
    return tokens


class EchoScorer:
    def __init__(self, max_score_tokens: int) -> None:
        self.max_score_tokens = max_score_tokens

    async def logprobs(
        self, model: LoadedModel, ids: tuple[int, ...], top_n: int = 0
    ) -> list[Scored]:
        """Each prompt token with its log-probability given the ones before (the first token
        has none) and its position's `top_n` alternatives. Raises InvalidRequest("echo") over
        the budget, and what the engine raises (Overloaded, NotReady)."""
        limit = min(self.max_score_tokens, model.max_context)
        if echo_cost(len(ids)) > limit:
            raise InvalidRequest(
                "echo",
                f"the log-probabilities of a {len(ids)}-token prompt are limited to {limit} "
                "tokens (max_score_tokens and the context): send a shorter prompt, or echo "
                "without logprobs",
            )
        first = Scored(ids[0], None, None)
        if len(ids) == 1:
            return [first]
        lps = await asyncio.wrap_future(model.engine.prompt_logprobs(list(ids), top_n, None))
        return [first, *(Scored(lp.token_id, lp.logprob, lp.top) for lp in lps)]
