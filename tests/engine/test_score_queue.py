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
    ((job, _, start, end, cost),) = queue.take(100)
    assert (start, end, cost) == (0, 32, 90) and job.done
    # Labels of two tokens with a shared first token share the row too; a new first
    # token is a new row of prompt + 1 tokens.
    queue.append(_job(90, [[7, 8], [7, 9], [5, 8]]))
    ((_, _, start, end, cost),) = queue.take(1000)
    assert (start, end, cost) == (0, 3, 91 + 91)
    # Over budget: at least one label a step, then as many as fit.
    queue.append(_job(90, [[7, 8], [5, 8], [6, 8]]))
    assert [c[2:] for c in queue.take(100)] == [(0, 1, 91)]
    assert [c[2:] for c in queue.take(200)] == [(1, 3, 182)]


def test_a_prompt_logprob_job_takes_its_budget_of_positions_where_the_backend_can() -> None:
    whole = ScoreQueue()  # no parts: the prompt runs whole
    whole.append(_job(300, [[1]], top_n=1))
    assert [c[2:] for c in whole.take(64)] == [(0, 300, 300)]
    # In parts: a budget of positions a step, the job staying at the head until fed.
    parts = ScoreQueue(parts=cast(Any, object()))  # take() never calls the backend
    job = _job(300, [[1]], top_n=1)
    parts.append(job)
    assert [c[2:] for c in parts.take(64)] == [(0, 64, 64)]
    assert [c[2:] for c in parts.take(200)] == [(64, 264, 200)]
    assert [c[2:] for c in parts.take(200)] == [(264, 300, 36)] and job.done
    assert not parts.jobs


def test_a_score_prompt_is_held_in_parts_and_each_label_costs_its_own_tokens() -> None:
    # Where the backend holds a prompt: labels with different input rows share one feed
    # of prompt[:-1], a budget of it a step, then each label costs len(label) (its row
    # is prompt[-1] + label[:-1]). Mutation: costing the labels prompt + label - 1 (the
    # held prompt not counted) takes one label a step below.
    parts = ScoreQueue(parts=cast(Any, object()))  # take() never calls the backend
    job = _job(90, [[7, 8], [5, 8], [6, 8], [4, 8]])
    parts.append(job)
    assert [(c.kind, c.start, c.end, c.cost) for c in parts.take(50)] == [("prompt", 0, 50, 50)]
    # The rest of the prompt, then labels in the same step while the budget lasts.
    assert [(c.kind, c.start, c.end, c.cost) for c in parts.take(43)] == [
        ("prompt", 50, 89, 39),
        ("labels", 0, 2, 4),
    ]
    assert [(c.kind, c.start, c.end, c.cost) for c in parts.take(100)] == [("labels", 2, 4, 4)]
    assert job.done and not parts.jobs
    # A prompt within budget whose labels share one row runs as before: nothing held.
    short = _job(20, [[100 + i] for i in range(8)])
    parts.append(short)
    assert [(c.kind, c.start, c.end, c.cost) for c in parts.take(100)] == [("labels", 0, 8, 20)]
    assert short.held is False
    # Without a backend that holds prompts, every distinct row carries the prompt.
    whole = ScoreQueue()
    whole.append(_job(90, [[7, 8], [5, 8]]))
    assert [(c.kind, c.cost) for c in whole.take(1000)] == [("labels", 182)]


class _Parts:
    """A backend that holds Score prompts, recording what each call is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def score_prompt_part(self, prompt_ids: list[int], start: int, end: int) -> None:
        self.calls.append(("part", (start, end)))

    def score_prompt_reset(self) -> None:
        self.calls.append(("reset", None))

    def prompt_logprobs_reset(self) -> None:
        pass

    def score_batch(self, jobs: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        self.calls.append(("batch", [len(p) for p, _ in jobs]))
        return [[-1.0] * len(conts) for _, conts in jobs]


def test_a_held_prompts_labels_run_apart_and_the_hold_goes_before_the_next_job() -> None:
    # Job A's prompt is held; job B (one row, within budget) is taken in the step A ends.
    # A's labels run in a batch of their own and the hold is emptied before B's row runs:
    # in a pooled cache B's row needs cells the hold would keep. Mutation: batching B's
    # labels with A's (the hold still in place) fails here.
    backend = _Parts()
    queue = ScoreQueue(parts=cast(Any, backend))
    a = _job(60, [[7, 8], [5, 8]])
    b = _job(50, [[100], [101]])
    queue.append(a)
    queue.append(b)
    queue.step(cast(Any, backend), 1000)
    assert backend.calls == [
        ("part", (0, 59)),
        ("batch", [60]),
        ("reset", None),
        ("batch", [50]),
    ]
    assert a.future.result(0) == [-1.0, -1.0] and b.future.result(0) == [-1.0, -1.0]
