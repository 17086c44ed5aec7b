"""Score jobs between decode steps, a bounded number of tokens at a time.

The scheduler hands `ScoreQueue.step` a token budget per engine step; the jobs at the head
of the queue give up to that many tokens of continuations (at least one), which run in one
batched `score_batch` call, and the decode step for the running streams follows. So a
Score of 32 long labels interleaves with generation instead of starving it, and its
deadline is honoured between chunks.

Where the backend keeps a prompt's KV across steps (`LogprobPartsBackend`), a prompt is
fed a budget at a time too: a prompt-logprob job (`echo` with `logprobs`) gives its
entries part by part (elsewhere it runs whole), and a Score whose labels have different
input rows, or whose prompt exceeds the step's budget, has its prompt held by the backend
and then each label costs only its own tokens (32 labels over a 90-token prompt cost the
prompt once, not 32 times, and no step runs a whole prompt). A job part-way is always the
head of the queue, so the chunks of a step run in the order taken and nothing else
touches the held KV before the job ends; when it ends, or leaves part-way (its caller gave
up), the hold is emptied before the next job runs.

A job's future stays pending until its answer is set, so a caller that gives up (a
deadline, a disconnect) can `cancel()` it at any time; the job then leaves the queue
before its next chunk runs. The answer of a job cancelled mid-chunk is dropped
(`settle`), never raised into the worker loop. Imports engine modules and torch only.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch

from slimserve.engine.backends.base import Backend, LogprobPartsBackend
from slimserve.engine.errors import DeadlineExpired, EngineFailure, Overloaded
from slimserve.engine.futures import settle
from slimserve.engine.sequence import ScoreJob
from slimserve.engine.types import TokenLogprob

log = logging.getLogger(__name__)
_T = TypeVar("_T")


#: What a chunk of Score work runs: labels (`score_batch`), a part of a Score prompt the
#: backend holds, or prompt log-probabilities (whole or a part).
LABELS, PROMPT, LOGPROBS = "labels", "prompt", "logprobs"


class _Chunk(NamedTuple):
    job: ScoreJob
    kind: str
    start: int
    end: int
    #: Tokens it puts through the model.
    cost: int


class ScoreQueue:
    """FIFO of Score jobs; touched by the worker thread, appended to under its lock."""

    def __init__(self, parts: LogprobPartsBackend | None = None) -> None:
        self.jobs: collections.deque[ScoreJob] = collections.deque()
        #: Runs prompt-logprob jobs in parts, or None: each runs whole.
        self.parts = parts
        #: The job whose prompt KV the backend holds: a prompt-logprob job part-way, or a
        #: Score whose labels run from its held prompt.
        self._open: ScoreJob | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def append(self, job: ScoreJob) -> None:
        self.jobs.append(job)

    def fail_all(self, exc: BaseException) -> None:
        while self.jobs:
            settle(self.jobs.popleft().future, exc=exc)

    def take(self, budget: int) -> list[_Chunk]:
        """Chunks of the head jobs worth up to `budget` tokens (the first at least one
        token, even over budget); expired jobs fail here."""
        chunks: list[_Chunk] = []
        now = time.monotonic()
        while self.jobs and budget > 0:
            job = self.jobs[0]
            if job.future.done():  # the caller gave up (cancelled): nothing more of it runs
                self.jobs.popleft()
                continue
            if job.deadline is not None and now >= job.deadline:
                self.jobs.popleft()
                if job.top_n is not None:
                    done = f"{job.fed} of {len(job.prompt)} prompt tokens"
                else:
                    done = f"{job.next} of {len(job.continuations)} labels"
                settle(job.future, exc=DeadlineExpired(f"deadline exceeded after {done}"))
                continue
            if job.top_n is not None:  # prompt positions [start, end)
                start, t = job.fed, len(job.prompt)
                end = t if self.parts is None else min(t, start + max(budget, 1))
                job.fed = end
                chunks.append(_Chunk(job, LOGPROBS, start, end, end - start))
                budget -= end - start
            else:
                if job.held is None:
                    job.held = self._holds(job, budget)
                held = len(job.prompt) - 1
                if job.held and job.fed < held:  # the prompt first, in parts: [start, end)
                    start, end = job.fed, min(held, job.fed + max(budget, 1))
                    job.fed = end
                    chunks.append(_Chunk(job, PROMPT, start, end, end - start))
                    budget -= end - start
                    if job.fed < held or budget <= 0:
                        break  # the rest of this job waits for the next step
                # continuations [start, end)
                start, end, cost = job.take(
                    budget if chunks else max(budget, 1), held if job.held else 0
                )
                chunks.append(_Chunk(job, LABELS, start, end, cost))
                budget -= cost
            if job.done:
                self.jobs.popleft()
            else:
                break  # the rest of this job waits for the next step
        return chunks

    def _holds(self, job: ScoreJob, budget: int) -> bool:
        """Whether `job`'s prompt is fed once and held while its labels run: where the
        backend can, and when it pays (labels with different input rows share it) or is
        needed (the prompt alone exceeds this step's budget)."""
        if self.parts is None or len(job.prompt) < 2 or not job.continuations:
            return False
        rows = {tuple(c[:-1]) for c in job.continuations}
        return len(rows) > 1 or len(job.prompt) > budget

    def step(self, backend: Backend, budget: int) -> int:
        """Run one budget's worth of score work, in the order taken; returns the tokens
        it put through."""
        taken = self.take(budget)
        if self._open is not None and not any(c.job is self._open for c in taken):
            self._close()  # it left part-way: its caller gave up, or its deadline passed
        labels: list[_Chunk] = []  # run batched, until another kind of chunk comes
        for chunk in taken:
            # Labels taken before a prompt part run first (each `score_batch` empties the
            # scratch where a prompt-logprob job keeps its KV part-way), and a held
            # prompt's labels run in a batch of their own (another job's rows need the
            # cells the hold takes from a pool).
            apart = labels and labels[-1].job.held and chunk.job is not labels[-1].job
            if chunk.kind != LABELS or apart:
                self._score(labels, backend)
                labels = []
            if self._open is not None and self._open is not chunk.job:
                self._let_go()  # every chunk of the job it holds for has run
            if chunk.kind == LABELS:
                labels.append(chunk)
            elif chunk.kind == PROMPT:
                self._prompt_part(chunk)
            elif self.parts is None:
                _prompt_logprobs(backend, chunk.job)
            else:
                self._logprob_part(chunk.job, chunk.start, chunk.end)
        self._score(labels, backend)
        self._let_go()
        return sum(c.cost for c in taken)

    def _let_go(self) -> None:
        """Empty the backend's hold once the job it holds for is answered or failed."""
        if self._open is not None and (self._open.done or self._open.future.done()):
            self._close()

    def _close(self) -> None:
        assert self.parts is not None
        self._open = None
        try:
            self.parts.prompt_logprobs_reset()
            self.parts.score_prompt_reset()
        except Exception:
            log.exception("emptying the scratch of a prompt left part-way failed")

    def _prompt_part(self, chunk: _Chunk) -> None:
        """Feed a part of a Score's prompt into the backend's hold."""
        assert self.parts is not None
        parts, job = self.parts, chunk.job
        self._open = job
        _guarded(job, "feeding a Score prompt", lambda: parts.score_prompt_part(
            job.prompt, chunk.start, chunk.end))  # fmt: skip

    def _logprob_part(self, job: ScoreJob, start: int, end: int) -> None:
        assert self.parts is not None and job.top_n is not None
        parts, top_n = self.parts, job.top_n
        self._open = None
        part = _logprobs(job, lambda: parts.prompt_logprobs_part(job.prompt, start, end, top_n))
        if part is None:  # failed: a part-way prompt's scratch is emptied
            if end < len(job.prompt):
                self._close()
            return
        job.logprobs += part
        if end < len(job.prompt):
            self._open = job  # the backend keeps its KV for the next part
        else:
            settle(job.future, job.logprobs)

    def _score(self, taken: list[_Chunk], backend: Backend) -> None:
        chunks = [(c.job, c.start, c.end) for c in taken if not c.job.future.done()]
        if not chunks:
            return
        work = [(job.prompt, job.continuations[a:b]) for job, a, b in chunks]
        try:
            results = backend.score_batch(work)
        except torch.OutOfMemoryError as exc:
            for job, _, _ in chunks:
                _fail(job, Overloaded(f"out of memory while scoring: {exc}"))
            return
        except Exception:
            # One bad job fails only itself: run each chunk alone.
            results = []
            for (job, _, _), (prompt, conts) in zip(chunks, work, strict=True):
                sums = _guarded(job, "score", functools.partial(backend.score, prompt, conts))
                results.append(sums or [])
        for (job, _, _), sums in zip(chunks, results, strict=True):
            if job.future.done():
                continue
            job.sums.extend(sums)
            if job.done:
                _finish(job)


def _prompt_logprobs(backend: Backend, job: ScoreJob) -> None:
    result = _logprobs(job, lambda: backend.prompt_logprobs(job.prompt, job.top_n or 0))
    if result is not None:
        settle(job.future, result)


def _logprobs(job: ScoreJob, run: Callable[[], list[TokenLogprob]]) -> list[TokenLogprob] | None:
    """`run()`'s log-probabilities, or None with `job` failed (out of memory, an error, a
    non-finite figure)."""
    result = _guarded(job, "prompt log-probabilities", run)
    if result is None:
        return None
    if not all(lp.logprob is not None and math.isfinite(lp.logprob) for lp in result):
        _fail(job, EngineFailure("the backend returned a non-finite log-probability"))
        return None
    return result


def _guarded(job: ScoreJob, what: str, run: Callable[[], _T]) -> _T | None:
    """`run()`, or None with `job` failed: out of memory is Overloaded, any other error
    fails the job as it is (logged as `what` failing)."""
    try:
        return run()
    except torch.OutOfMemoryError as exc:
        _fail(job, Overloaded(f"out of memory while scoring: {exc}"))
    except Exception as exc:
        log.exception("%s failed", what)
        _fail(job, exc)
    return None


def _fail(job: ScoreJob, exc: BaseException) -> None:
    job.next, job.fed = len(job.continuations), len(job.prompt)  # nothing more of it runs
    settle(job.future, exc=exc)


def _finish(job: ScoreJob) -> None:
    if not all(map(math.isfinite, job.sums)):
        # A NaN would read as "not fraud" to a client comparing with a threshold.
        exc = EngineFailure(f"the backend returned a non-finite log-probability: {job.sums}")
        settle(job.future, exc=exc)
        return
    settle(job.future, job.sums)
