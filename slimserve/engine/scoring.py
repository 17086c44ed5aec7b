"""Score jobs between decode steps, a bounded number of tokens at a time.

The scheduler hands `ScoreQueue.step` a token budget per engine step; the jobs at the head
of the queue give up to that many tokens of continuations (at least one), which run in one
batched `score_batch` call, and the decode step for the running streams follows. So a
Score of 32 long labels interleaves with generation instead of starving it, and its
deadline is honoured between chunks.

A prompt-logprob job (`echo` with `logprobs`) runs the same way, a budget of prompt
positions a step, where the backend keeps the prompt's KV between parts
(`LogprobPartsBackend`); elsewhere it runs whole. A job part-way is always the head of
the queue and its part runs after the step's other Score work, so nothing else touches the
backend's scratch sequence before it ends; one that leaves part-way (its caller gave up)
has the scratch emptied before the next job runs.

A job's future stays pending until its answer is set, so a caller that gives up (a
deadline, a disconnect) can `cancel()` it at any time; the job then leaves the queue
before its next chunk runs. The answer of a job cancelled mid-chunk is dropped
(`settle`), never raised into the worker loop. Imports engine modules and torch only.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable

import torch

from slimserve.engine.backends.base import Backend, LogprobPartsBackend
from slimserve.engine.errors import DeadlineExpired, EngineFailure, Overloaded
from slimserve.engine.futures import settle
from slimserve.engine.sequence import ScoreJob
from slimserve.engine.types import TokenLogprob

log = logging.getLogger(__name__)


class ScoreQueue:
    """FIFO of Score jobs; touched by the worker thread, appended to under its lock."""

    def __init__(self, parts: LogprobPartsBackend | None = None) -> None:
        self.jobs: collections.deque[ScoreJob] = collections.deque()
        #: Runs prompt-logprob jobs in parts, or None: each runs whole.
        self.parts = parts
        #: The prompt-logprob job whose KV the backend's scratch holds part-way.
        self._open: ScoreJob | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def append(self, job: ScoreJob) -> None:
        self.jobs.append(job)

    def fail_all(self, exc: BaseException) -> None:
        while self.jobs:
            settle(self.jobs.popleft().future, exc=exc)

    def take(self, budget: int) -> list[tuple[ScoreJob, int, int, int]]:
        """Chunks of the head jobs worth up to `budget` tokens, each with the tokens it
        puts through; expired jobs fail here."""
        chunks: list[tuple[ScoreJob, int, int, int]] = []
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
                cost = end - start
            else:  # continuations [start, end)
                start, end, cost = job.take(budget if chunks else max(budget, 1))
            budget -= cost
            chunks.append((job, start, end, cost))
            if job.done:
                self.jobs.popleft()
            else:
                break  # the rest of this job waits for the next step
        return chunks

    def step(self, backend: Backend, budget: int) -> int:
        """Run one budget's worth of score work; returns the tokens it put through."""
        taken = self.take(budget)
        if self._open is not None and not any(c[0] is self._open for c in taken):
            self._close()  # it left part-way: its caller gave up, or its deadline passed
        spent = sum(c[3] for c in taken)
        chunks = [(job, start, end) for job, start, end, _ in taken]
        # Continuations first: `score_batch` empties the scratch sequences it uses, so a
        # prompt left part-way in one must be fed after it.
        self._score([c for c in chunks if c[0].top_n is None], backend)
        for job, start, end in [c for c in chunks if c[0].top_n is not None]:
            if self.parts is None:
                _prompt_logprobs(backend, job)
            else:
                self._logprob_part(job, start, end)
        return spent

    def _close(self) -> None:
        assert self.parts is not None
        self._open = None
        try:
            self.parts.prompt_logprobs_reset()
        except Exception:
            log.exception("emptying the scratch of a prompt left part-way failed")

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

    def _score(self, chunks: list[tuple[ScoreJob, int, int]], backend: Backend) -> None:
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
                try:
                    results.append(backend.score(prompt, conts))
                except torch.OutOfMemoryError as exc:
                    _fail(job, Overloaded(f"out of memory while scoring: {exc}"))
                    results.append([])
                except Exception as exc:
                    log.exception("score failed")
                    _fail(job, exc)
                    results.append([])
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
    try:
        result = run()
    except torch.OutOfMemoryError as exc:
        _fail(job, Overloaded(f"out of memory while scoring: {exc}"))
        return None
    except Exception as exc:
        log.exception("prompt log-probabilities failed")
        _fail(job, exc)
        return None
    if not all(lp.logprob is not None and math.isfinite(lp.logprob) for lp in result):
        _fail(job, EngineFailure("the backend returned a non-finite log-probability"))
        return None
    return result


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
