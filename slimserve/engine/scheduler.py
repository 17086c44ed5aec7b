"""The engine: one worker thread that owns a backend and runs a continuous batch.

Between two decode steps the worker admits waiting requests (prefill, first token), drops
cancelled or expired ones, runs at most `score_step_tokens` of queued `Score` work
(`scoring.ScoreQueue`), then advances every running sequence by one token in a single
batched `decode` call. Consumers receive `Event`s through a callback invoked on the worker
thread; it must not block. If the loop itself fails, every pending request fails, the
engine stops taking work (`serving` turns False) and `on_failure` hears of it: a dead
thread never hides behind a SERVING server. Imports torch and engine modules only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np
import torch

from slimserve.engine import planner
from slimserve.engine.backends.base import Backend, Capabilities, Feed, can_speculate
from slimserve.engine.config import DraftConfig, EngineConfig
from slimserve.engine.errors import EngineFailure, InvalidRequest, NotReady, Overloaded
from slimserve.engine.planner import StepBudget, StepPlan
from slimserve.engine.prefix import PrefixCache, as_tokens, common_prefix
from slimserve.engine.sampling import greedy_rows, select, token_logprob
from slimserve.engine.scoring import ScoreQueue
from slimserve.engine.sequence import Constraint, Handle, ScoreJob, SeqState, Sequence
from slimserve.engine.spec_policy import DraftPolicy
from slimserve.engine.speculative import Drafter
from slimserve.engine.speculative_step import SpeculativeSteps
from slimserve.engine.text import Decoder
from slimserve.engine.types import (
    PHASES,
    BackendInfo,
    EngineInfo,
    EngineStats,
    Event,
    Finish,
    GenerationRequest,
    Occupancy,
    StopReason,
    Timings,
    TokenLogprob,
)

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]


class Tokenizer(Decoder, Protocol):
    eos_token_id: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineHooks:
    """What an engine's owner hears, on the worker thread: `on_flush` after each phase of a
    step (admission, prefill, decode; the engine process sends that phase's events in one
    frame), `on_failure` once, when the loop itself dies (the engine process exits on it;
    a server holding the engine in process turns the model NOT_SERVING)."""

    on_flush: Callable[[], None] | None = None
    on_failure: Callable[[BaseException], None] | None = None


def _alone(step: StepPlan, seq: Sequence) -> StepPlan:
    """The part of `step` that is `seq`'s."""
    return StepPlan(
        decode=tuple(s for s in step.decode if s is seq),
        chunks=tuple(c for c in step.chunks if c.seq is seq),
    )


def _slot_of(seq: Sequence) -> int:
    return -1 if seq.slot is None else seq.slot


#: Prompt tokens a sequence being fed must still share with a waiting one for the waiting
#: one to wait for it (`Engine._awaits_donor`): fewer are cheaper to feed than to wait for.
_WAIT_FOR_DONOR = 32


def _prompt_array(seq: Sequence) -> np.ndarray:
    if seq.prompt_array is None:
        seq.prompt_array = as_tokens(seq.req.prompt_ids)
    return seq.prompt_array  # type: ignore[no-any-return]


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


class Engine(SpeculativeSteps):
    """Continuous batching over one backend. Thread-safe `submit`, `score` and `cancel`."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        *,
        info: EngineInfo | None = None,
        drafter: Drafter | None = None,
        draft: DraftConfig | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
        policy: DraftPolicy | None = None,
        hooks: EngineHooks | None = None,
    ) -> None:
        """`drafter` turns on speculative decoding (`slimserve.engine.speculative`), as
        `draft` says (tokens per step, policy); the backend must then implement
        `SpeculativeBackend`. `policy` decides how many draft tokens to verify each step
        (None: measured at `start` for the "adaptive" policy). `eos_token_ids` end a
        sequence besides the tokenizer's own EOS.

        Raises:
            ValueError: a drafter for a backend that cannot verify drafts.
        """
        if drafter is not None and not can_speculate(backend):
            raise ValueError(f"backend {backend.name} cannot verify drafts (no extend/truncate)")
        self.backend = backend
        self.drafter = drafter
        #: What the backend can do beyond the `Backend` protocol, resolved once.
        self.caps = Capabilities.of(backend)
        self._decode = self.caps.decode
        self._prefill_batch = self.caps.prefill_batch
        #: How this engine serves (set by the loader; tests that build an engine may omit it).
        self.info: EngineInfo = info or _bare_info(backend)
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.draft = draft or DraftConfig()
        self.hooks = hooks or EngineHooks()
        eos = set(eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        #: Token ids that end a sequence.
        self.eos_token_ids = frozenset(eos)
        self._eos = self.eos_token_ids
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._scores = ScoreQueue(self.caps.logprob_parts)
        self._running: list[Sequence] = []
        #: Free slots, a heap: the lowest is taken first, so running slots stay packed low
        #: (llama.cpp's per-stream cache runs a step's consecutive slots as one batch).
        self._free = list(range(backend.max_slots))
        #: A backend whose slots share one pool of cache cells (llama.cpp) names its size; a
        #: request is admitted only while the pool can hold all it may grow to.
        self._pool = self.caps.pool_tokens
        #: Keep the running slots consecutive from 0 (`_compact`), where the backend asks.
        self._packing = self.caps.packing is not None and (drafter is None or drafter.can_move)
        #: Sequences holding a slot whose prompt is still being fed, a chunk a step.
        self._prefilling: list[Sequence] = []
        self._budget = StepBudget(self.config.max_step_ms, capacity=self.caps.step_tokens)
        #: The residues of finished prompts in free slots (`prefix`), where the backend
        #: feeds prompts in chunks and can start a slot from cached KV.
        self._prefix: PrefixCache | None = None
        if self.config.prefix_cache and self.caps.prefix and self.caps.forward:
            self._prefix = PrefixCache()
        #: Residues evicted at admission (by whose admission, slot), released by the
        #: worker before the next step.
        self._evicted: list[tuple[Sequence, int]] = []
        self._reserved = 0
        self._stats = EngineStats(free_slots=backend.max_slots)
        #: Seconds per decode-step phase (worker thread only; `stats` copies it).
        self._phase = dict.fromkeys(PHASES, 0.0)
        self._stopping = False
        #: An engine in this process is never restarted (the `EngineLike` field).
        self.restarts = 0
        #: Why the worker loop died, if it did.
        self.failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        #: When the step now running began (`time.monotonic()`); None while idle. The engine
        #: process reports it, so a watchdog can tell a stuck step from a quiet engine.
        self.step_started: float | None = None
        #: How many draft tokens to verify each step (`spec_policy`); None: always all.
        self._policy = policy

    # ---- submitter side (any thread) ---------------------------------------------------
    def start(self) -> None:
        adaptive = self.draft.policy == "adaptive"
        if self.drafter is not None and adaptive and self._policy is None:
            self._policy = self._measure_passes()
        self._thread = threading.Thread(target=self._loop, name="slimserve-engine", daemon=True)
        self._thread.start()

    def submit(
        self, req: GenerationRequest, sink: Sink, *, matcher: Constraint | None = None
    ) -> Handle:
        """Queue a request; events go to `sink` on the worker thread. `matcher` holds the
        output to a grammar (structured output): every token is picked from what it allows,
        and the sequence ends where the grammar does.

        Raises:
            Overloaded: the admission queue is full.
            NotReady: the engine is stopping.
        """
        handle = Handle(self, req.request_id)
        seq = Sequence(req, sink, handle, self.tokenizer, matcher)
        with self._cond:
            self._check_open()
            if len(self._waiting) >= self.config.max_queue + len(self._free):
                raise Overloaded(
                    f"admission queue full ({self.config.max_queue} waiting, "
                    f"{self.backend.max_slots} running); retry later"
                )
            self._waiting.append(seq)
            self._cond.notify()
        return handle

    def score(
        self,
        prompt_ids: list[int],
        continuations: list[list[int]],
        deadline: float | None = None,
    ) -> concurrent.futures.Future[list[float]]:
        """Queue a scoring job, run in budgeted chunks between decode steps; the future
        holds each continuation's summed log-probability.

        Raises:
            InvalidRequest: the job puts more than `max_score_tokens` through the model.
            Overloaded: the score queue is full.
            NotReady: the engine is stopping or its loop failed.
        """
        fut: concurrent.futures.Future[list[float]] = concurrent.futures.Future()
        job = ScoreJob(
            prompt=prompt_ids, continuations=continuations, future=fut, deadline=deadline
        )
        if job.total_cost > self.config.max_score_tokens:
            raise InvalidRequest(
                "labels",
                f"prompt and labels need {job.total_cost} tokens of forward passes; "
                f"the limit is {self.config.max_score_tokens}",
            )
        self._enqueue(job)
        return fut

    def prompt_logprobs(
        self, prompt_ids: list[int], top_n: int = 0, deadline: float | None = None
    ) -> concurrent.futures.Future[list[TokenLogprob]]:
        """Queue a job for each prompt token's log-probability given the ones before it and
        the `top_n` best tokens at its position (what an echo with logprobs returns); run
        with the step's Score work, a budget of prompt positions a step where the backend
        keeps the prompt's KV between parts (`LogprobPartsBackend`), else whole.

        Raises:
            InvalidRequest: the prompt is longer than `max_score_tokens` or the context.
            Overloaded, NotReady: as `score`.
        """
        if len(prompt_ids) > min(self.config.max_score_tokens, self.backend.max_seq_len):
            raise InvalidRequest(
                "prompt",
                f"{len(prompt_ids)} tokens; prompt log-probabilities take at most "
                f"{min(self.config.max_score_tokens, self.backend.max_seq_len)}",
            )
        fut: concurrent.futures.Future[list[TokenLogprob]] = concurrent.futures.Future()
        job = ScoreJob(
            prompt=prompt_ids,
            continuations=[prompt_ids[1:] or prompt_ids],
            future=fut,
            deadline=deadline,
            top_n=top_n,
        )
        self._enqueue(job)
        return fut

    def _enqueue(self, job: ScoreJob) -> None:
        with self._cond:
            self._check_open()
            if len(self._scores) >= self.config.max_queue:
                raise Overloaded(f"score queue full ({self.config.max_queue}); retry later")
            self._scores.append(job)
            self._cond.notify()

    def _check_open(self) -> None:
        if self.failure is not None:
            raise NotReady(f"the engine loop failed: {self.failure!r}")
        if self._stopping:
            raise NotReady("the engine is shutting down")

    @property
    def policy(self) -> DraftPolicy | None:
        """How it chooses the draft tokens to verify (None: no drafter, or always all)."""
        return self._policy

    @property
    def serving(self) -> bool:
        """Whether the worker loop is alive and taking work."""
        return self.failure is None and not self._stopping

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stats(self) -> EngineStats:
        """The counters so far, copied (every field of `_stats`, so a new one is never left
        out), with the queue and slot figures of this moment."""
        with self._cond:
            s = self._stats
            return msgspec.structs.replace(
                s,
                running=len(self._running) + len(self._prefilling),
                queued=len(self._waiting),
                free_slots=len(self._free),
                finished=dict(s.finished),
                phase_s=dict(self._phase),
            )

    def occupancy(self) -> Occupancy:
        """Slots and cache cells held now (any thread; exact between steps, which is when
        the engine process sends it, and a moment's snapshot otherwise).

        It takes no lock (each `len` and list copy is one atomic read), so the engine
        process can read it under its pipe's lock, which a sink takes under the engine's:
        the figure sent last is then always the latest one."""
        running, prefilling = list(self._running), list(self._prefilling)
        max_slots = self.backend.max_slots
        cells = self._pool if self._pool is not None else max_slots * self.backend.max_seq_len
        waiting, free = len(self._waiting), len(self._free)
        return Occupancy(
            running=len(running) + len(prefilling),
            waiting=waiting,
            free_slots=free,
            # A prompt being fed a chunk a step holds the cells fed so far.
            kv_cells_used=sum(len(s.tokens) for s in running) + sum(s.fed for s in prefilling),
            kv_cells=cells,
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel everything still queued or running and stop the worker."""
        with self._cond:
            self._stopping = True
            for seq in [*self._waiting, *self._prefilling, *self._running]:
                seq.handle.cancelled = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- worker thread -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug in the loop itself, not in one request
            log.critical("the engine loop failed; failing every request", exc_info=exc)
            self._fail_everything(exc)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._waiting
                    or self._scores
                    or self._running
                    or self._prefilling
                    or self._stopping
                ):
                    self.step_started = None
                    self._cond.wait()
                self.step_started = time.monotonic()
                if self._stopping and not (self._running or self._prefilling):
                    self._drop_waiting(StopReason.CANCELLED)
                    self._scores.fail_all(NotReady("the engine is shutting down"))
                    stopped = True
                else:
                    stopped = False
                    admitted = self._admit_locked()
            if stopped:
                self._flush()
                return
            self._flush()  # the finishes of requests that expired while waiting
            if self.caps.forward is not None:
                if self._prefix is not None:
                    self._start_placed(admitted)
                self._prefilling += admitted
                self._step()
            else:
                self._whole_prompt_step(admitted)

    def _step(self) -> None:
        """One planned step (`planner`): Score work, then every decoding sequence's token
        and chunks of the prompts being fed, in one backend pass (with a drafter, the
        chunks and the speculative step run apart)."""
        self._reap()
        t0 = time.perf_counter()
        decoding = len(self._running)
        step = planner.plan(
            self._prefilling,
            sorted(self._running, key=_slot_of) if self.drafter is None else (),
            budget=self._budget.tokens(decoding),
            scores_waiting=bool(self._scores),
            score_step_tokens=self.config.score_step_tokens,
        )
        scored = self._scores.step(self.backend, step.score_tokens) if step.score_tokens else 0
        if self._running and self._packing:
            t = time.perf_counter()
            self._compact()
            self._phase["compact"] += time.perf_counter() - t
        if step.decode or step.chunks:
            self._mixed_step(step)
        if self.drafter is not None and self._running:
            self._flush()  # first tokens out before the speculative step
            self._decode_step()
        took = time.perf_counter() - t0
        self._budget.observe(decoding, step.prompt_tokens + scored, took)
        if decoding and took * 1e3 > 10 * self.config.max_step_ms:
            log.warning(
                "a step took %.0f ms, over 10x its %.0f ms budget: %d decoding, prompt chunks "
                "%s, %d Score tokens",
                took * 1e3, self.config.max_step_ms, len(step.decode),
                [(c.seq.req.request_id, c.start, c.end) for c in step.chunks], scored,
            )  # fmt: skip
        t = time.perf_counter()
        self._flush()
        self._phase["flush"] += time.perf_counter() - t

    def _whole_prompt_step(self, admitted: list[Sequence]) -> None:
        """A step for a backend without chunked prefill: Score work, the admitted prompts
        prefilled whole, then a decode step."""
        if self._scores:
            self._scores.step(self.backend, self.config.score_step_tokens)
        if admitted:
            t = time.perf_counter()
            self._prefill_all(admitted)
            self._phase["prefill"] += time.perf_counter() - t
        self._reap()
        self._flush()  # first tokens out before the next decode step
        if self._running:
            if self._packing:
                t = time.perf_counter()
                self._compact()
                self._phase["compact"] += time.perf_counter() - t
            self._decode_step()
            t = time.perf_counter()
            self._flush()
            self._phase["flush"] += time.perf_counter() - t

    def _mixed_step(self, step: StepPlan) -> None:
        """Run `step`'s decode tokens and prompt chunks in one `forward`, in slot order (a
        split cache takes runs of consecutive slots per pass), then update each sequence:
        a finished prompt gives its first token, a decoding sequence its next."""
        assert self.caps.forward is not None
        feeds: list[tuple[Sequence, Feed]] = [
            (seq, Feed(seq.slot, [seq.last_token], True))
            for seq in step.decode
            if seq.slot is not None
        ]
        for c in step.chunks:
            if c.seq.slot is not None:
                ids = list(c.seq.req.prompt_ids[c.start : c.end])
                feeds.append((c.seq, Feed(c.seq.slot, ids, c.last)))
        feeds.sort(key=lambda sf: sf[1].slot)
        t1 = time.perf_counter()
        try:
            block = self.caps.forward([f for _, f in feeds])
        except Exception as exc:
            if len(feeds) == 1:
                self._fail(feeds[0][0], exc)
                return
            # Each feed alone, so that one the backend refuses (checked before anything
            # runs) fails only its own request.
            log.debug("a mixed step failed (%r); feeding each sequence alone", exc)
            for seq, _ in feeds:
                self._mixed_step(_alone(step, seq))
            return
        t2 = time.perf_counter()
        rows = {}
        at = 0
        for seq, feed in feeds:
            if feed.logits:
                rows[id(seq)] = at
                at += 1
        for c in step.chunks:
            c.seq.fed = c.end
        for c in step.chunks:
            if c.last and c.seq.state is SeqState.RUNNING:
                self._prefilling.remove(c.seq)
                self._started(c.seq, block[rows[id(c.seq)]])
        self._phase["prefill"] += t2 - t1 if step.chunks and not step.decode else 0.0
        if step.decode:
            with self._cond:
                self._stats.steps += 1
            batch = [s for s in step.decode if id(s) in rows]
            at_rows = [rows[id(s)] for s in batch]
            logits = block  # the rows in batch order: as they are, or gathered
            if at_rows != list(range(len(block))):
                logits = block.index_select(0, torch.tensor(at_rows, dtype=torch.long))
            self._pick_and_emit(batch, logits, t1, t2)

    def _flush(self) -> None:
        if self.hooks.on_flush is not None:
            self.hooks.on_flush()

    def _fail_everything(self, exc: BaseException) -> None:
        with self._cond:
            self.failure = exc
            pending = [*self._waiting, *self._prefilling, *self._running]
            self._waiting.clear()
            self._prefilling.clear()
            self._scores.fail_all(NotReady(f"the engine loop failed: {exc!r}"))
        for seq in pending:
            seq.state = SeqState.FINISHED
            seq.sink(Event(error=NotReady(f"the engine loop failed: {exc!r}")))
        self._running.clear()
        if self.hooks.on_failure is not None:
            self.hooks.on_failure(exc)

    def _admit_locked(self) -> list[Sequence]:
        now = time.monotonic()
        admitted: list[Sequence] = []
        for seq in list(self._waiting):
            reason = seq.expired_reason(now)
            if reason is not None:
                self._waiting.remove(seq)
                self._finish(seq, reason, "")
        at = 0  # the first waiting sequence not left to wait for a donor
        while at < len(self._waiting) and self._free:
            seq = self._waiting[at]
            if self._prefix is not None and self._awaits_donor(seq, admitted):
                at += 1
                continue
            need = self._reservation(seq)
            if self._prefix is not None:
                if not self._admit_placed(seq, need, admitted):
                    break
            else:
                if self._pool is not None and self._reserved and self._reserved + need > self._pool:
                    break  # first come, first served: it waits until the pool has room
                seq.slot = heapq.heappop(self._free)
            del self._waiting[at]
            seq.reserved = need
            self._reserved += need
            seq.state = SeqState.RUNNING
            seq.t_admit = now
            admitted.append(seq)
            self._stats.admitted += 1
            self._stats.prompt_tokens += len(seq.req.prompt_ids)
        return admitted

    def _awaits_donor(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        """Whether `seq` should wait (a few steps) for a sequence that is feeding the same
        prompt beginning, then copy it, rather than feed it again beside it: `n` > 1
        choices of one prompt, or a burst of requests with one system prompt, pay for one
        prefill. Later arrivals are admitted meanwhile. Lock held."""
        assert self._prefix is not None
        prompt = _prompt_array(seq)
        for s in [*self._prefilling, *admitted]:
            if s.fed >= len(s.req.prompt_ids):
                continue  # fed: a donor already
            shared = min(common_prefix(_prompt_array(s), prompt), len(prompt) - 1)
            if shared >= max(_WAIT_FOR_DONOR, 2 * self._prefix.min_tokens) + s.fed:
                return True
        return False

    def _admit_placed(self, seq: Sequence, need: int, admitted: list[Sequence]) -> bool:
        """Place `seq` where its prompt's longest cached prefix is (`PrefixCache.place`),
        evicting residues of a pooled cache, least recently used first, while the pool
        lacks room; False (nothing changed): it waits for room. Lock held."""
        prefix = self._prefix
        assert prefix is not None
        prompt = _prompt_array(seq)
        donors = [
            (s.slot, prompt_s[: s.fed])
            for s, prompt_s in self._donors(admitted)
            if s.slot is not None and s.fed >= prefix.min_tokens
        ]
        place = prefix.place(prompt, self._free, donors)
        evict: list[int] = []
        if self._pool is not None:
            residue = prefix.cells - prefix.tokens(place.slot)
            for slot in prefix.evictable(keep=place.slot):
                if self._reserved + need + residue <= self._pool:
                    break
                if slot != place.source:
                    evict.append(slot)
                    residue -= prefix.tokens(slot)
            if self._reserved and self._reserved + need + residue > self._pool:
                return False  # first come, first served: it waits until the pool has room
        for slot in evict:
            prefix.drop(slot)
            self._evicted.append((seq, slot))
        self._free.remove(place.slot)
        heapq.heapify(self._free)
        prefix.drop(place.slot)  # taken: reused in place, or released when applied
        seq.slot, seq.placement = place.slot, place
        seq.fed = place.length  # for donors admitted after it in this round
        return True

    def _donors(self, admitted: list[Sequence]) -> list[tuple[Sequence, np.ndarray]]:
        """Sequences whose prompt KV may be copied: running, being fed, or admitted just
        before in this round (with the prefix they start from), each with its prompt."""
        return [(s, _prompt_array(s)) for s in [*self._running, *self._prefilling, *admitted]]

    def _start_placed(self, admitted: list[Sequence]) -> None:
        """Apply the admissions' placements on the backend (worker thread, lock free):
        release the evicted residues, then start each sequence from its cached prefix."""
        prefix = self.caps.prefix
        assert prefix is not None
        evicted, self._evicted = self._evicted, []
        for seq in admitted:
            # Evictions in admission order: a slot copied from by an earlier admission is
            # released only after that copy.
            for slot in [slot for by, slot in evicted if by is seq]:
                self.backend.release(slot)
            place, seq.placement = seq.placement, None
            if place is None or seq.slot is None:
                continue
            try:
                if not place.length:
                    self.backend.release(place.slot)  # it may hold a residue
                elif place.source == place.slot:
                    prefix.truncate(place.slot, place.length)
                else:
                    assert place.source is not None
                    prefix.copy_prefix(place.source, place.slot, place.length)
            except Exception as exc:  # start it afresh: the prompt is fed whole
                log.warning("reusing %d cached tokens failed: %r", place.length, exc)
                self.backend.release(place.slot)
                seq.fed = 0
                continue
            seq.cached = place.length  # `fed` says so since admission
            if place.length:
                with self._cond:
                    self._stats.prefix_hits += 1
                    self._stats.cached_tokens += place.length

    def _compact(self) -> None:
        """Keep the running slots consecutive (`PackingBackend`): while a free slot lies
        between the lowest and the highest running one, move the highest down into it. A
        move copies one stream of cache once; a step over a broken run of slots costs a
        pass per break, every step until it closes. A run need not start at slot 0
        (llama.cpp batches increasing sequence ids), so the free slots below it keep their
        prefix-cache residues."""
        while self._free and len(self._running) > 1:
            top = max(self._running, key=_slot_of)
            bottom = min(self._running, key=_slot_of)
            assert top.slot is not None and bottom.slot is not None  # running
            gaps = [f for f in self._free if bottom.slot < f < top.slot]
            if not gaps:
                return
            low = min(gaps)
            src = top.slot
            try:
                assert self.caps.packing is not None  # `_packing` says so
                if self._prefix is not None and self._prefix.drop(low):
                    self.backend.release(low)  # its residue gives way
                self.caps.packing.move(src, low)
                if self.drafter is not None:
                    self.drafter.move(src, low)
            except Exception as exc:  # its cache may be half moved: end it, stop packing
                log.warning("moving a sequence from slot %d to %d failed: %r", src, low, exc)
                self._packing = False
                self._fail(top, exc)
                return
            with self._cond:
                self._free.remove(low)  # `low` taken, `src` free
                heapq.heapify(self._free)
                heapq.heappush(self._free, src)
                self._stats.slot_moves += 1
            top.slot = low

    def _reservation(self, seq: Sequence) -> int:
        """Cache cells `seq` may come to hold: its prompt, every token it may generate, and
        a step of draft tokens in flight."""
        drafts = self.draft.tokens if self.drafter is not None else 0
        grow = len(seq.req.prompt_ids) + seq.req.stopping.max_new_tokens + drafts
        return min(self.backend.max_seq_len, grow)

    def _drop_waiting(self, reason: StopReason) -> None:
        while self._waiting:
            self._finish(self._waiting.popleft(), reason, "")

    def _prefill_all(self, seqs: list[Sequence]) -> None:
        """Prefill the sequences just admitted: in one batched pass where the backend has
        one, else (or when the batch fails: then each prompt's own error is found) one by
        one."""
        if self._prefill_batch is None or len(seqs) < 2:
            for seq in seqs:
                self._prefill(seq)
            return
        now = time.monotonic()
        for seq in seqs:
            seq.t_admit = now
        if self._packing:
            # A split cache runs a batch in passes that take as many tokens from each
            # sequence of a run of consecutive slots. Longest prompts on the lowest slots
            # keep the run unbroken as short prompts end: a pass per distinct length, not
            # one per break (16 prompts: TTFT 339 ms; slots fresh, so free to reassign).
            slots = sorted(s.slot for s in seqs if s.slot is not None)
            seqs = sorted(seqs, key=lambda s: -len(s.req.prompt_ids))
            for seq, slot in zip(seqs, slots, strict=True):
                seq.slot = slot
        try:
            slots = [s.slot for s in seqs if s.slot is not None]  # all: admitted
            rows = self._prefill_batch(slots, [list(s.req.prompt_ids) for s in seqs])
        except Exception as exc:
            log.debug("batched prefill failed (%r); prefilling one by one", exc)
            for seq in seqs:
                self._prefill(seq)
            return
        for seq, logits in zip(seqs, rows, strict=True):
            self._started(seq, logits)

    def _prefill(self, seq: Sequence) -> None:
        assert seq.slot is not None  # admitted
        seq.t_admit = time.monotonic()
        try:
            logits = self.backend.prefill(seq.slot, list(seq.req.prompt_ids))
        except Exception as exc:
            self._fail(seq, exc)
            return
        self._started(seq, logits)

    def _started(self, seq: Sequence, logits: torch.Tensor) -> None:
        """A prefilled sequence: its drafter's start, then its first token."""
        assert seq.slot is not None  # admitted
        try:
            if self.drafter is not None:
                self.drafter.begin(seq.slot, seq.req.prompt_ids)
        except Exception as exc:
            self._fail(seq, exc)
            return
        seq.prefill_ms = (time.monotonic() - seq.t_admit) * 1e3
        self._running.append(seq)
        if seq.matcher is not None:
            seq.matcher.mask_logits_(logits)
        self._advance(seq, None, logits)

    def _decode_step(self) -> None:
        # In slot order: a llama.cpp cache split per stream takes a run of consecutive slots
        # into one pass, and a step out of order costs a pass per break in the run.
        batch = sorted(self._running, key=_slot_of)
        t0 = time.perf_counter()
        proposals = self._propose(batch) if self.drafter is not None else None
        t1 = time.perf_counter()
        self._phase["draft"] += t1 - t0
        if proposals is not None:
            self._verify_step(batch, proposals)
            return
        try:
            slots = [s.slot for s in batch if s.slot is not None]
            logits = self._decode(slots, [s.last_token for s in batch])
        except Exception as exc:
            for seq in batch:
                self._fail(seq, exc)
            return
        t2 = time.perf_counter()
        if self._policy is not None:
            self._policy.observe_step([1] * len(batch), t2 - t1)
        with self._cond:
            self._stats.steps += 1
        self._pick_and_emit(batch, logits, t1, t2)

    def _pick_and_emit(
        self, batch: list[Sequence], logits: torch.Tensor, t1: float, t2: float
    ) -> None:
        """Each sequence's next token from its logits row (masked by its grammar, if any;
        greedy rows in one call), emitted; `t1`..`t2` was the forward pass."""
        for i, seq in enumerate(batch):  # structured output: only what the grammar allows
            if seq.matcher is not None:
                seq.matcher.mask_logits_(logits[i])
        picks: list[int] | list[None] = [None] * len(batch)
        if all(s.req.sampling.is_greedy for s in batch):
            picks = greedy_rows(logits)  # one call for the common case
        t3 = time.perf_counter()
        for i, seq in enumerate(batch):
            self._advance(seq, picks[i], logits[i])
        self._phase["forward"] += t2 - t1
        self._phase["pick"] += t3 - t2
        self._phase["emit"] += time.perf_counter() - t3

    def _advance(self, seq: Sequence, token: int | None, logits: torch.Tensor) -> None:
        """Pick (unless given) and emit one token; a failure ends only this request."""
        try:
            self._on_token(seq, self._pick(seq, logits) if token is None else token, logits)
        except Exception as exc:
            self._fail(seq, exc)

    def _pick(self, seq: Sequence, logits: torch.Tensor) -> int:
        params = seq.req.sampling
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(list(seq.req.prompt_ids) + seq.generated, dtype=torch.long)
        return select(logits, params, seq.generator, seen)

    def _on_token(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        now = time.monotonic()
        if not seq.generated:
            seq.t_first = now
        seq.t_last = now
        if seq.spec.guess is not None and self._policy is not None:
            self._policy.check(seq.spec, token)
        if seq.matcher is not None and not seq.matcher.accept(token):
            why = seq.matcher.error or f"token {token} is not allowed here"
            self._fail(seq, EngineFailure(f"structured output broke: {why}"))
            return
        seq.generated.append(token)
        seq.tokens.append(token)
        seq.last_token = token
        lp: tuple[TokenLogprob, ...] = ()
        if seq.req.logprobs:
            lp = (self.with_text(token_logprob(logits, token, seq.req.top_n)),)
        stop = seq.req.stopping
        # A grammar's EOS ends it whatever ignore_eos says: nothing can follow its end.
        if token in self._eos and (not stop.ignore_eos or seq.matcher is not None):
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

    def with_text(self, lp: TokenLogprob) -> TokenLogprob:
        """`lp` with the text of its token and of each alternative (decoded here, where the
        tokens are, and only when a request asks for log-probabilities)."""
        decode = self.tokenizer.decode
        top_text = tuple(decode([t]) for t, _ in lp.top)
        return TokenLogprob(lp.token_id, lp.logprob, lp.top, decode([lp.token_id]), top_text)

    def _reap(self) -> None:
        now = time.monotonic()
        for seq in [*self._prefilling, *self._running]:
            reason = seq.expired_reason(now)
            if reason is not None:
                self._finish(seq, reason, "")

    def _finish(
        self,
        seq: Sequence,
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
        self._release(seq, keep=True)
        now = time.monotonic()
        t_first = seq.t_first or now
        timings = Timings(
            queue_ms=((seq.t_admit or now) - seq.t_arrival) * 1e3,
            prefill_ms=seq.prefill_ms,
            ttft_ms=(t_first - seq.t_arrival) * 1e3 if seq.generated else 0.0,
            decode_ms=(seq.t_last - t_first) * 1e3 if seq.generated else 0.0,
            total_ms=(now - seq.t_arrival) * 1e3,
            draft=self.drafter.name if self.drafter is not None else "",
            draft_proposed=seq.draft_proposed,
            draft_accepted=seq.draft_accepted,
        )
        finish = Finish(
            reason=reason,
            stop_sequence=seq.stops.matched,
            input_tokens=len(seq.req.prompt_ids),
            generated_tokens=len(seq.generated),
            timings=timings,
            cached_tokens=seq.cached,
        )
        with self._cond:
            self._stats.generated_tokens += len(seq.generated)
            self._stats.finished[reason.value] = self._stats.finished.get(reason.value, 0) + 1
        seq.sink(Event(text=text, token_ids=token_ids, logprobs=lp, finish=finish))

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        if isinstance(exc, torch.OutOfMemoryError):
            exc = Overloaded(f"out of memory on {self.backend.device}: {exc}")
        else:
            log.exception("request %s failed", seq.req.request_id, exc_info=exc)
        self._release(seq)
        seq.sink(Event(error=exc))

    def _release(self, seq: Sequence, keep: bool = False) -> None:
        """Free `seq`'s slot; with `keep` (it ended well), its prompt's KV stays there as
        a residue for the prefix cache."""
        if seq.state is SeqState.RUNNING and seq in self._running:
            self._running.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        seq.state = SeqState.FINISHED
        if seq.slot is not None:
            kept = self._residue(seq) if keep and self._prefix is not None else None
            if kept is None:
                self.backend.release(seq.slot)
            if self.drafter is not None:
                self.drafter.release(seq.slot)
            with self._cond:
                heapq.heappush(self._free, seq.slot)
                self._reserved -= seq.reserved
                seq.reserved = 0
                if kept is not None and self._prefix is not None:
                    self._prefix.keep(seq.slot, kept)
            seq.slot = None

    def _residue(self, seq: Sequence) -> list[int] | None:
        """The tokens whose KV `seq` leaves complete in its slot, the slot cut back to them;
        None: nothing worth keeping (the slot is then released). Its prompt as far as fed,
        and, without a drafter, the tokens it generated and fed (all but the last)."""
        assert self._prefix is not None and self.caps.prefix is not None and seq.slot is not None
        prompt = list(seq.req.prompt_ids)
        tokens = prompt[: seq.fed]
        if seq.fed == len(prompt) and self.drafter is None and seq.generated:
            tokens += seq.generated[:-1]
        if len(tokens) < self._prefix.min_tokens:
            return None
        try:
            self.caps.prefix.truncate(seq.slot, len(tokens))
        except ValueError:  # holds fewer than counted: keep nothing rather than guess
            return None
        return tokens
