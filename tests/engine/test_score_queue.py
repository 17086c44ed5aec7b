"""The Score queue's budget: what a step takes of each job, counted as the backend runs it."""

from __future__ import annotations

import concurrent.futures
from typing import Any, cast

from slimserve.engine.scoring import ScoreQueue
from slimserve.engine.sequence import ScoreJob


def _job(prompt: int, labels: list[list[int]], top_n: int | None = None) -> ScoreJob:
    return ScoreJob(
        prompt=list(range(3, 3 + prompt)),
        continuations=labels,
        future=concurrent.futures.Future(),
        top_n=top_n,
    )


def test_labels_sharing_an_input_row_cost_it_once() -> None:
    # 32 one-token labels: every row is the prompt alone, which the backend runs once.
    # Mutation: costing each label prompt + label - 1 takes 2 labels a step (and tells the
    # step budget 32x the tokens that ran).
    queue = ScoreQueue()
    queue.append(_job(90, [[100 + i] for i in range(32)]))
    ((job, start, end, cost),) = queue.take(100)
    assert (start, end, cost) == (0, 32, 90) and job.done
    # Labels of two tokens with a shared first token share the row too; a new first
    # token is a new row of prompt + 1 tokens.
    queue.append(_job(90, [[7, 8], [7, 9], [5, 8]]))
    ((_, start, end, cost),) = queue.take(1000)
    assert (start, end, cost) == (0, 3, 91 + 91)
    # Over budget: at least one label a step, then as many as fit.
    queue.append(_job(90, [[7, 8], [5, 8], [6, 8]]))
    assert [c[1:] for c in queue.take(100)] == [(0, 1, 91)]
    assert [c[1:] for c in queue.take(200)] == [(1, 3, 182)]


def test_a_prompt_logprob_job_takes_its_budget_of_positions_where_the_backend_can() -> None:
    whole = ScoreQueue()  # no parts: the prompt runs whole
    whole.append(_job(300, [[1]], top_n=1))
    assert [c[1:] for c in whole.take(64)] == [(0, 300, 300)]
    # In parts: a budget of positions a step, the job staying at the head until fed.
    parts = ScoreQueue(parts=cast(Any, object()))  # take() never calls the backend
    job = _job(300, [[1]], top_n=1)
    parts.append(job)
    assert [c[1:] for c in parts.take(64)] == [(0, 64, 64)]
    assert [c[1:] for c in parts.take(200)] == [(64, 264, 200)]
    assert [c[1:] for c in parts.take(200)] == [(264, 300, 36)] and job.done
    assert not parts.jobs
