"""The engine: one worker thread that owns a backend and runs a continuous batch.

Between two decode steps the worker admits waiting requests (prefill, first token), drops
cancelled or expired ones, runs queued `Score` jobs, then advances every running sequence
by one token in a single batched `decode` call. Consumers receive `Event`s through a
callback invoked on the worker thread; it must not block (the servicer hands events to its
event loop with `call_soon_threadsafe`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from slimserve.engine.backends.base import Backend
from slimserve.engine.errors import NotReady, Overloaded
from slimserve.engine.sampling import make_generator, select, token_logprob
from slimserve.engine.text import Decoder, IncrementalDetokenizer, StopMatcher
from slimserve.engine.types import (
    BackendInfo,
    EngineInfo,
    EngineStats,
    Event,
    Finish,
    GenerationRequest,
    StopReason,
    Timings,
    TokenLogprob,
)

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]


class Tokenizer(Decoder, Protocol):
    eos_token_id: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    #: Requests waiting for a slot beyond this are refused with `Overloaded`.
    max_queue: int = 64
    #: Token ids that end a sequence (besides the tokenizer's own EOS).
    eos_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


def _bare_info(backend: Backend) -> EngineInfo:
    return EngineInfo(
        backend=BackendInfo(
            name=backend.name,
            max_slots=backend.max_slots,
            max_seq_len=backend.max_seq_len,
            vocab_size=backend.vocab_size,
            kv_bytes=backend.kv_bytes_per_slot(),
        ),
        plan=backend.name,
        kernels=backend.name,
        device=str(backend.device),
        dtype="float32",
        max_context=backend.max_seq_len,
        threads=torch.get_num_threads(),
        pid=os.getpid(),
        in_process=True,
    )


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


class _Sequence:
    """A request while it waits or runs; touched only by the worker thread once admitted."""

    __slots__ = (
        "detok",
        "generated",
        "generator",
        "handle",
        "last_token",
        "prefill_ms",
        "req",
        "sink",
        "slot",
        "stops",
        "t_admit",
        "t_arrival",
        "t_first",
        "t_last",
    )

    def __init__(self, req: GenerationRequest, sink: Sink, handle: Handle, tok: Decoder) -> None:
        self.req = req
        self.sink = sink
        self.handle = handle
        self.slot = -1
        self.generated: list[int] = []
        self.last_token = -1
        self.detok = IncrementalDetokenizer(tok, req.prompt_ids)
        self.stops = StopMatcher(req.stopping.stop_sequences)
        self.generator = make_generator(req.sampling)
        self.t_arrival = time.monotonic()
        self.t_admit = self.t_first = self.t_last = 0.0
        self.prefill_ms = 0.0

    def expired_reason(self, now: float) -> StopReason | None:
        if self.handle.cancelled or (self.req.deadline is not None and now >= self.req.deadline):
            return StopReason.CANCELLED
        limit = self.req.stopping.time_limit_s
        if limit is not None and now - self.t_arrival >= limit:
            return StopReason.TIME_LIMIT
        return None


class Engine:
    """Continuous batching over one backend. Thread-safe `submit`, `score` and `cancel`."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        config: EngineConfig,
        info: EngineInfo | None = None,
    ) -> None:
        self.backend = backend
        #: How this engine serves (set by the loader; tests that build an engine may omit it).
        self.info: EngineInfo = info or _bare_info(backend)
        self.tokenizer = tokenizer
        self.config = config
        eos = set(config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self._eos = frozenset(eos)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._scores: collections.deque[
            tuple[list[int], list[list[int]], concurrent.futures.Future[list[float]]]
        ] = collections.deque()
        self._running: list[_Sequence] = []
        self._free = list(range(backend.max_slots - 1, -1, -1))
        self._stats = EngineStats(free_slots=backend.max_slots)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- submitter side (any thread) ---------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="slimserve-engine", daemon=True)
        self._thread.start()

    def submit(self, req: GenerationRequest, sink: Sink) -> Handle:
        """Queue a request; events go to `sink` on the worker thread.

        Raises:
            Overloaded: the admission queue is full.
            NotReady: the engine is stopping.
        """
        handle = Handle(self, req.request_id)
        seq = _Sequence(req, sink, handle, self.tokenizer)
        with self._cond:
            if self._stopping:
                raise NotReady("the engine is shutting down")
            if len(self._waiting) >= self.config.max_queue + len(self._free):
                raise Overloaded(
                    f"admission queue full ({self.config.max_queue} waiting, "
                    f"{self.backend.max_slots} running); retry later"
                )
            self._waiting.append(seq)
            self._cond.notify()
        return handle

    def score(
        self, prompt_ids: list[int], continuations: list[list[int]]
    ) -> concurrent.futures.Future[list[float]]:
        """Queue a scoring job, run between decode steps; the future holds log-probs."""
        fut: concurrent.futures.Future[list[float]] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise NotReady("the engine is shutting down")
            if len(self._scores) >= self.config.max_queue:
                raise Overloaded(f"score queue full ({self.config.max_queue}); retry later")
            self._scores.append((prompt_ids, continuations, fut))
            self._cond.notify()
        return fut

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            s = self._stats
            return EngineStats(
                running=len(self._running),
                queued=len(self._waiting),
                free_slots=len(self._free),
                steps=s.steps,
                generated_tokens=s.generated_tokens,
                finished=dict(s.finished),
            )

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel everything still queued or running and stop the worker."""
        with self._cond:
            self._stopping = True
            for seq in list(self._waiting) + self._running:
                seq.handle.cancelled = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- worker thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._scores or self._running or self._stopping):
                    self._cond.wait()
                if self._stopping and not self._running:
                    self._drop_waiting(StopReason.CANCELLED)
                    self._fail_scores(NotReady("the engine is shutting down"))
                    return
                scores = list(self._scores)
                self._scores.clear()
                admitted = self._admit_locked()
            if scores:
                self._run_scores(scores)
            for seq in admitted:
                self._prefill(seq)
            self._reap()
            if self._running:
                self._decode_step()

    def _admit_locked(self) -> list[_Sequence]:
        now = time.monotonic()
        admitted = []
        for seq in list(self._waiting):
            reason = seq.expired_reason(now)
            if reason is not None:
                self._waiting.remove(seq)
                self._finish(seq, reason, "")
        while self._waiting and self._free:
            seq = self._waiting.popleft()
            seq.slot = self._free.pop()
            admitted.append(seq)
        return admitted

    def _drop_waiting(self, reason: StopReason) -> None:
        while self._waiting:
            self._finish(self._waiting.popleft(), reason, "")

    def _fail_scores(self, exc: BaseException) -> None:
        while self._scores:
            self._scores.popleft()[2].set_exception(exc)

    def _run_scores(
        self,
        jobs: list[tuple[list[int], list[list[int]], concurrent.futures.Future[list[float]]]],
    ) -> None:
        """Every Score queued since the last step in one batched forward.

        If the batch fails, each job runs alone so one bad job fails only itself.
        """
        live = [j for j in jobs if j[2].set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self.backend.score_batch([(p, c) for p, c, _ in live])
        except torch.OutOfMemoryError as exc:
            for _, _, fut in live:
                fut.set_exception(Overloaded(f"out of memory while scoring: {exc}"))
            return
        except Exception:
            for prompt, conts, fut in live:
                self._run_score(prompt, conts, fut)
            return
        for (_, _, fut), result in zip(live, results, strict=True):
            fut.set_result(result)

    def _run_score(
        self,
        prompt: list[int],
        conts: list[list[int]],
        fut: concurrent.futures.Future[list[float]],
    ) -> None:
        try:
            fut.set_result(self.backend.score(prompt, conts))
        except torch.OutOfMemoryError as exc:
            fut.set_exception(Overloaded(f"out of memory while scoring: {exc}"))
        except Exception as exc:
            log.exception("score failed")
            fut.set_exception(exc)

    def _prefill(self, seq: _Sequence) -> None:
        seq.t_admit = time.monotonic()
        try:
            logits = self.backend.prefill(seq.slot, list(seq.req.prompt_ids))
        except Exception as exc:
            self._fail(seq, exc)
            return
        seq.prefill_ms = (time.monotonic() - seq.t_admit) * 1e3
        self._running.append(seq)
        self._advance(seq, None, logits)

    def _decode_step(self) -> None:
        batch = list(self._running)
        try:
            logits = self.backend.decode([s.slot for s in batch], [s.last_token for s in batch])
        except Exception as exc:
            for seq in batch:
                self._fail(seq, exc)
            return
        with self._cond:
            self._stats.steps += 1
        picks: list[int | None] = [None] * len(batch)
        if all(s.req.sampling.is_greedy for s in batch):
            picks = logits.argmax(dim=-1).tolist()  # one call for the common case
        for i, seq in enumerate(batch):
            self._advance(seq, picks[i], logits[i])

    def _advance(self, seq: _Sequence, token: int | None, logits: torch.Tensor) -> None:
        """Pick (unless given) and emit one token; a failure ends only this request."""
        try:
            self._on_token(seq, self._pick(seq, logits) if token is None else token, logits)
        except Exception as exc:
            self._fail(seq, exc)

    def _pick(self, seq: _Sequence, logits: torch.Tensor) -> int:
        params = seq.req.sampling
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(list(seq.req.prompt_ids) + seq.generated, dtype=torch.long)
        return select(logits, params, seq.generator, seen)

    def _on_token(self, seq: _Sequence, token: int, logits: torch.Tensor) -> None:
        now = time.monotonic()
        if not seq.generated:
            seq.t_first = now
        seq.t_last = now
        seq.generated.append(token)
        seq.last_token = token
        lp: tuple[TokenLogprob, ...] = ()
        if seq.req.logprobs:
            lp = (token_logprob(logits, token, seq.req.top_n),)
        stop = seq.req.stopping
        if token in self._eos and not stop.ignore_eos:
            self._finish(seq, StopReason.EOS_TOKEN, seq.detok.flush(), (token,), lp)
            return
        text = seq.stops.feed(seq.detok.push(token))
        reason = None
        if seq.stops.matched:
            reason = StopReason.STOP_SEQUENCE
        elif len(seq.generated) >= stop.max_new_tokens:
            reason = StopReason.MAX_TOKENS
        elif len(seq.req.prompt_ids) + len(seq.generated) >= self.backend.max_seq_len:
            reason = StopReason.TOKEN_LIMIT
        if reason is not None:
            self._finish(seq, reason, text, (token,), lp)
            return
        seq.sink(Event(text=text, token_ids=(token,), logprobs=lp))

    def _reap(self) -> None:
        now = time.monotonic()
        for seq in list(self._running):
            reason = seq.expired_reason(now)
            if reason is not None:
                self._finish(seq, reason, "")

    def _finish(
        self,
        seq: _Sequence,
        reason: StopReason,
        text: str,
        token_ids: tuple[int, ...] = (),
        lp: tuple[TokenLogprob, ...] = (),
    ) -> None:
        if not seq.stops.matched:
            text += seq.stops.feed(seq.detok.flush())
            if seq.stops.matched:
                reason = StopReason.STOP_SEQUENCE
            else:
                text += seq.stops.remainder()
        self._release(seq)
        now = time.monotonic()
        t_first = seq.t_first or now
        timings = Timings(
            queue_ms=((seq.t_admit or now) - seq.t_arrival) * 1e3,
            prefill_ms=seq.prefill_ms,
            ttft_ms=(t_first - seq.t_arrival) * 1e3 if seq.generated else 0.0,
            decode_ms=(seq.t_last - t_first) * 1e3 if seq.generated else 0.0,
            total_ms=(now - seq.t_arrival) * 1e3,
        )
        finish = Finish(
            reason=reason,
            stop_sequence=seq.stops.matched,
            input_tokens=len(seq.req.prompt_ids),
            generated_tokens=len(seq.generated),
            timings=timings,
        )
        with self._cond:
            self._stats.generated_tokens += len(seq.generated)
            self._stats.finished[reason.value] = self._stats.finished.get(reason.value, 0) + 1
        seq.sink(Event(text=text, token_ids=token_ids, logprobs=lp, finish=finish))

    def _fail(self, seq: _Sequence, exc: BaseException) -> None:
        if isinstance(exc, torch.OutOfMemoryError):
            exc = Overloaded(f"out of memory on {self.backend.device}: {exc}")
        else:
            log.exception("request %s failed", seq.req.request_id, exc_info=exc)
        self._release(seq)
        seq.sink(Event(error=exc))

    def _release(self, seq: _Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if seq.slot >= 0:
            self.backend.release(seq.slot)
            with self._cond:
                self._free.append(seq.slot)
            seq.slot = -1
