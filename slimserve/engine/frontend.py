"""A model's engine as the server calls it: requests in as text, events out, nothing blocking.

`Frontend` puts the text work in front of a scheduler (`Engine`), which sees token ids only:
each call is queued for one worker thread that tokenizes (`inputs.InputProcessor`), then
hands the request to the scheduler, in arrival order. The caller (an event loop) never
waits for a tokenizer. The engine process serves every request through one `Frontend`
(`process.child_main`); a server that runs its engine in process uses one directly.

A generation's events: `Event(accepted=...)` once its prompt is tokenized and queued, then
the scheduler's text deltas and its finish, or an `Event(error=...)` at any point (a prompt
that does not fit, a full queue). Score, prompt log-probabilities and Tokenize answer
through futures the caller may cancel: a cancelled job leaves the scheduler's queue.
Imports engine modules only.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from slimserve.engine.errors import InvalidRequest, NotReady
from slimserve.engine.futures import settle
from slimserve.engine.inputs import InputProcessor
from slimserve.engine.types import (
    EngineInfo,
    EngineStats,
    Event,
    GenerationRequest,
    Guided,
    Prompt,
    ScoreRequest,
    ScoreResult,
    TokenizeResult,
    TokenLogprob,
)

if TYPE_CHECKING:
    from slimserve.engine.loader import LocalModel
    from slimserve.engine.scheduler import Engine

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]


class FrontHandle:
    """The caller's side of a submitted generation."""

    __slots__ = ("_cancelled", "_inner", "request_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._inner: Any = None
        self._cancelled = False

    def cancel(self) -> None:
        """Stop the request at the engine's next step (a final CANCELLED event follows)."""
        self._cancelled = True
        if self._inner is not None:
            self._inner.cancel()

    def _started(self, inner: Any) -> None:
        # Set, then check: a cancel on another thread in between cancels through either.
        self._inner = inner
        if self._cancelled:
            inner.cancel()


class Frontend:
    """An in-process `Engine` behind one text worker (module docstring). Thread-safe."""

    def __init__(
        self, engine: Engine, inputs: InputProcessor, grammars: Grammars | None = None
    ) -> None:
        self.engine = engine
        self.inputs = inputs
        #: Structured output's compiler (None: requests asking for it are refused).
        self.grammars = grammars
        #: Times the engine was restarted (never: it lives and dies with this process).
        self.restarts = 0
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="slimserve-inputs", daemon=True)
        self._worker.start()

    @classmethod
    def of(cls, local: LocalModel) -> Frontend:
        """A frontend over a model loaded in this process."""
        info = local.info
        inputs = InputProcessor(
            local.tokenizer, vocab_size=info.backend.vocab_size, max_context=info.max_context
        )
        eos = sorted(local.engine.eos_token_ids)
        grammars = Grammars(local.tokenizer, info.backend.vocab_size, eos) if eos else None
        return cls(local.engine, inputs, grammars)

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def serving(self) -> bool:
        return self.engine.serving and self._worker.is_alive()

    def _run(self) -> None:
        while (job := self._work.get()) is not None:
            try:
                job()
            except Exception:  # each job reports its own errors; this is a bug
                log.exception("an input job failed")

    def _queue(self, job: Callable[[], None]) -> None:
        if not self.engine.serving:
            raise NotReady("the engine is not serving")
        self._work.put(job)

    # ---- calls --------------------------------------------------------------------------
    def submit(self, req: GenerationRequest, sink: Sink) -> FrontHandle:
        """Queue a generation; its events go to `sink` (on the worker or the scheduler).

        Raises:
            NotReady: the engine is not serving.
        """
        handle = FrontHandle(req.request_id)

        def job() -> None:
            try:
                tokenized, accepted = self.inputs.generation(req)
                matcher = self._matcher(req.guided) if req.guided is not None else None
                sink(Event(accepted=accepted))
                handle._started(self.engine.submit(tokenized, sink, matcher=matcher))
            except Exception as exc:
                sink(Event(error=exc))

        self._queue(job)
        return handle

    def _matcher(self, guided: Guided) -> Any:
        """A fresh grammar state for `guided` (compiled once per spec, then cached).

        Raises:
            InvalidRequest: naming `guided`, when the spec cannot be compiled for this model
                (or this engine has no structured output): never free text instead.
        """
        if self.grammars is None:
            raise InvalidRequest("guided", "this model's tokenizer has no end-of-sequence token")
        return self.grammars.matcher(guided)

    def score(self, req: ScoreRequest) -> concurrent.futures.Future[ScoreResult]:
        out: concurrent.futures.Future[ScoreResult] = concurrent.futures.Future()

        def job() -> None:
            prompt, labels = self.inputs.score(req)
            inner = self.engine.score(prompt, labels, req.deadline)
            _chain(
                inner,
                out,
                lambda sums: ScoreResult(
                    logprobs=tuple(sums),
                    input_tokens=len(prompt),
                    label_tokens=tuple(map(len, labels)),
                ),
            )

        self._queue(lambda: _guarded(job, out))
        return out

    def prompt_logprobs(
        self, prompt: Prompt, top_n: int = 0, deadline: float | None = None, limit: int = 0
    ) -> concurrent.futures.Future[list[TokenLogprob]]:
        """Each prompt token with its log-probability given the ones before (None for the
        first) and its position's `top_n` alternatives, texts included (an echo's
        logprobs)."""
        out: concurrent.futures.Future[list[TokenLogprob]] = concurrent.futures.Future()

        def job() -> None:
            ids = list(self.inputs.prompt_ids(prompt, limit))
            first = self.with_texts([TokenLogprob(ids[0], None)])
            if len(ids) == 1:
                settle(out, first)
                return
            inner = self.engine.prompt_logprobs(ids, top_n, deadline)
            _chain(inner, out, lambda lps: first + self.with_texts(lps))

        self._queue(lambda: _guarded(job, out))
        return out

    def with_texts(self, lps: list[TokenLogprob]) -> list[TokenLogprob]:
        """`lps` with each token's and each alternative's text."""
        texts = self.inputs.token_texts
        return [
            TokenLogprob(
                lp.token_id,
                lp.logprob,
                lp.top,
                texts([lp.token_id])[0],
                texts([t for t, _ in lp.top]),
            )
            for lp in lps
        ]

    def tokenize(
        self, prompt: Prompt, limit: int = 0, *, tokens: bool = False
    ) -> concurrent.futures.Future[TokenizeResult]:
        out: concurrent.futures.Future[TokenizeResult] = concurrent.futures.Future()
        self._queue(
            lambda: _guarded(
                lambda: settle(out, self.inputs.tokenize(prompt, limit, tokens=tokens)), out
            )
        )
        return out

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._work.put(None)
        self.engine.shutdown(timeout)
        self._worker.join(timeout)


def _guarded(job: Callable[[], Any], out: concurrent.futures.Future[Any]) -> None:
    """Run `job`; what it raises answers `out` (unless the caller gave up first)."""
    if out.cancelled():
        return
    try:
        job()
    except Exception as exc:
        settle(out, exc=exc)


def _chain(
    inner: concurrent.futures.Future[Any],
    out: concurrent.futures.Future[Any],
    convert: Callable[[Any], Any],
) -> None:
    """`out` answered by `inner` through `convert`; cancelling `out` cancels `inner`."""

    def done(fut: concurrent.futures.Future[Any]) -> None:
        if fut.cancelled():
            out.cancel()
        elif (exc := fut.exception()) is not None:
            settle(out, exc=exc)
        else:
            try:
                settle(out, convert(fut.result()))
            except Exception as exc:
                settle(out, exc=exc)

    inner.add_done_callback(done)
    out.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)


class Grammars:
    """Structured output for one model: its grammar compiler, built on first use (~0.5 s
    for a 49,152-token vocabulary), and each request's spec compiled into a fresh matcher
    (`structured.GrammarCompiler`, which caches compiled specs)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._compiler: Any = None
        self._lock = threading.Lock()

    def matcher(self, guided: Guided) -> Any:
        from slimserve.engine.structured import GrammarCompiler

        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler.from_tokenizer(
                    self._tokenizer, self._vocab_size, self._eos
                )
        return self._compiler.compile(guided).matcher()
