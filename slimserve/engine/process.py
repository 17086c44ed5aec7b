"""One served model's engine in a child process, and the server's handle on it.

The child (`child_main`) verifies and loads the artifact, builds the backend, runs the
scheduler behind a `frontend.Frontend` (which tokenizes) and answers frames
(`slimserve.engine.ipc`) on a pipe. The server holds a `RemoteEngine`: the same calls as
a `Frontend` (submit, score, prompt_logprobs, tokenize, stats, shutdown), and a reader
thread that turns frames back into events. The engine process alone decides admission: a
full queue comes back as an `Overloaded` error of the request. Native code that crashes (SIGSEGV,
abort, an OOM kill) takes only the child: the reader sees the pipe close, every request in
flight ends at once with `NotReady` naming the model and the signal, and `on_exit` tells
the supervisor. Children fork from a forkserver that has torch and llama_cpp imported,
so a start costs the model load, not the imports. Imports no grpc.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from slimserve.engine import ipc
from slimserve.engine.backends.select import Plan
from slimserve.engine.config import ModelConfig
from slimserve.engine.errors import LoadFailed, NotReady
from slimserve.engine.futures import settle
from slimserve.engine.types import (
    EngineInfo,
    EngineStats,
    Event,
    GenerationRequest,
    Occupancy,
    Prompt,
    ScoreRequest,
    ScoreResult,
    TokenizeResult,
    TokenLogprob,
)

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]
_PRELOAD = ["slimserve.engine.loader", "slimserve.engine.scheduler", "llama_cpp"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildSpec:
    """Everything an engine process needs, as plain values (it crosses the process line)."""

    registry: str
    name: str
    version: int
    config: ModelConfig
    #: The plan to serve; None = the static choice (`select.plans_for`'s first).
    plan: dict[str, Any] | None = None
    refused: dict[str, str] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)
    threads: int = 0
    log_level: int = logging.WARNING

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def describe_exit(code: int | None) -> str:
    """An exit code in words: "killed by SIGSEGV", "exited with 3"."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with {code}"


def progress_interval(step_timeout_s: float) -> float:
    """Seconds between an engine's PROGRESS frames (and the watchdog's looks at them)."""
    return min(1.0, step_timeout_s / 4)


def mp_context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


# ---- the child ----------------------------------------------------------------------------
def child_main(conn: Connection, spec: ChildSpec) -> None:
    """Entry point of an engine process (configures its own logging)."""
    import torch

    from slimserve.engine.frontend import Frontend
    from slimserve.engine.loader import load, resolve_draft
    from slimserve.engine.scheduler import EngineHooks
    from slimserve.registry.store import Registry

    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s engine[{spec.ref} pid %(process)d] %(levelname)s %(name)s: "
        "%(message)s",
    )
    if spec.threads:
        torch.set_num_threads(spec.threads)
    bridge = _Bridge(conn)
    try:
        artifact = Registry(Path(spec.registry)).get(spec.name, str(spec.version))
        plan = Plan.from_dict(spec.plan) if spec.plan else None
        draft = resolve_draft(Path(spec.registry), spec.config)
        # A dead scheduler loop ends the process, so the supervisor restarts it.
        hooks = EngineHooks(on_flush=bridge.flush, on_failure=lambda _exc: os._exit(70))
        local = load(
            artifact, spec.config, plan=plan, refused=spec.refused, draft=draft, hooks=hooks
        )
    except BaseException as exc:
        bridge.send(ipc.Failed(error=exc))
        return
    info = local.info.replace(in_process=False, measured=dict(spec.measured))
    bridge.send(ipc.Ready(info=info))
    front = Frontend.of(local)
    bridge.send(ipc.Events(items=[], occupancy=front.occupancy()))  # the gauges' first figure
    limit = spec.config.restart.step_timeout_s
    if limit > 0:
        threading.Thread(
            target=_heartbeat,
            args=(local.engine, bridge, progress_interval(limit)),
            name="slimserve-engine-heartbeat",
            daemon=True,
        ).start()
    bridge.serve(front)


def _heartbeat(engine: Any, bridge: _Bridge, interval: float) -> None:
    """Tell the server, every `interval` s, how long the current step has run. A step stuck
    in native code that holds the GIL stops these frames too: silence counts as stuck."""
    while True:
        time.sleep(interval)
        started = engine.step_started
        try:
            busy_s = 0.0 if started is None else time.monotonic() - started
            bridge.send(ipc.Progress(busy_s=busy_s))
        except OSError:
            return  # the server is gone


class _Bridge:
    """The engine process's side of the pipe: frames in, answers and events out.

    Events wait in `pending` until the end of the step's phase (`flush`, the scheduler's
    hook), then cross in one frame: one wake-up of the server per step, not one per stream.
    The frame carries the engine's `Occupancy` after that step, so the server's load gauges
    are never a step behind and a scrape never costs a round trip.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.codec = ipc.engine_codec()
        self.front: Any = None
        self.handles: dict[int, Any] = {}
        #: Score / prompt-logprob / tokenize jobs in the engine, by the server's call id.
        self.calls: dict[int, concurrent.futures.Future[Any]] = {}
        self.pending: list[tuple[int, Event]] = []
        self._lock = threading.Lock()  # one frame at a time on the pipe; `pending`

    def send(self, frame: Any) -> None:
        with self._lock:
            self.conn.send_bytes(self.codec.encode(frame))

    def flush(self) -> None:
        if not self.pending:
            return
        with self._lock:
            if not self.pending:
                return
            # Read under the pipe's lock (`occupancy` takes no lock): frames leave in the
            # order their figures were read, so the last one sent is never older than a
            # slot freed before it. Read before the lock, a frame flushed from the input
            # thread could cross after the step's own and leave the gauges a slot short
            # for as long as the engine then stays idle.
            now = self.front.occupancy() if self.front is not None else None
            batch, self.pending = self.pending, []
            self.conn.send_bytes(self.codec.encode(ipc.Events(items=batch, occupancy=now)))

    def serve(self, front: Any) -> None:
        self.front = front
        decode = ipc.engine_codec().decode  # this thread's own decoder
        while True:
            try:
                frame = decode(self.conn.recv_bytes())
            except (EOFError, OSError):
                break  # the server is gone: stop serving
            if isinstance(frame, ipc.Stop):
                break
            self._handle(frame)
        front.shutdown()

    def _handle(self, frame: Any) -> None:
        front = self.front
        if isinstance(frame, ipc.Submit):
            self.handles[frame.rid] = front.submit(frame.request, self._sink(frame.rid))
        elif isinstance(frame, ipc.Cancel):
            handle = self.handles.get(frame.rid)
            if handle is not None:
                handle.cancel()
        elif isinstance(frame, ipc.ScoreCall):
            self._answer(frame.cid, front.score(frame.request), ipc.Scored, "result")
        elif isinstance(frame, ipc.PromptLogprobsCall):
            fut = front.prompt_logprobs(frame.prompt, frame.top_n, frame.deadline, frame.limit)
            self._answer(frame.cid, fut, ipc.PromptScored, "logprobs")
        elif isinstance(frame, ipc.TokenizeCall):
            fut = front.tokenize(frame.prompt, frame.limit, tokens=frame.tokens)
            self._answer(frame.cid, fut, ipc.Tokenized, "result")
        elif isinstance(frame, ipc.CancelCall):
            fut = self.calls.pop(frame.cid, None)
            if fut is not None:
                fut.cancel()  # the job leaves the engine's queue before its next chunk
        elif isinstance(frame, ipc.StatsCall):
            self.send(ipc.StatsReply(cid=frame.cid, stats=front.stats()))

    def _sink(self, rid: int) -> Callable[[Event], None]:
        def sink(ev: Event) -> None:  # on the input worker or the scheduler's thread
            if ev.error is not None or ev.finish is not None:
                self.handles.pop(rid, None)
            with self._lock:
                self.pending.append((rid, ev))
            if ev.error is not None or ev.accepted is not None:
                self.flush()  # not waiting for a step: the engine may be idle

        return sink

    def _answer(
        self, cid: int, fut: concurrent.futures.Future[Any], kind: type, field: str
    ) -> None:
        def done(f: concurrent.futures.Future[Any]) -> None:
            self.calls.pop(cid, None)
            if f.cancelled():
                return  # cancelled at the server's word: it expects no answer
            exc = f.exception()
            if exc is not None:
                self.send(ipc.CallFailed(cid=cid, error=exc))
            else:
                self.send(kind(cid=cid, **{field: f.result()}))

        self.calls[cid] = fut
        fut.add_done_callback(done)


# ---- the server's side --------------------------------------------------------------------
class RemoteHandle:
    __slots__ = ("_engine", "_rid", "request_id")

    def __init__(self, engine: RemoteEngine, rid: int, request_id: str) -> None:
        self._engine = engine
        self._rid = rid
        self.request_id = request_id

    def cancel(self) -> None:
        """Stop the request at the engine's next step (a final CANCELLED event follows)."""
        self._engine._cancel(self._rid)


class RemoteEngine:
    """An engine process, driven like an in-process `Frontend`. Thread-safe."""

    def __init__(
        self,
        spec: ChildSpec,
        *,
        on_exit: Callable[[RemoteEngine, int | None], None] | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        self.spec = spec
        self.on_exit = on_exit
        self.start_timeout_s = start_timeout_s
        self.info: EngineInfo
        self.exit_code: int | None = None
        self._process: Any = None
        self._pid: int | None = None
        self._conn: Connection | None = None
        #: (when the last PROGRESS frame came, monotonic; seconds its step had then run).
        self._progress = (time.monotonic(), 0.0)
        self._send_lock = threading.Lock()
        self._encoder = ipc.server_codec()  # under _send_lock
        self._ids = itertools.count(1)
        self._sinks: dict[int, Sink] = {}
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}
        self._stopping = False
        self._dead = False
        self._reader: threading.Thread | None = None
        self._occupancy = Occupancy()
        self._released = False
        self._killed_why: str | None = None
        self._release_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        """Serving: the process runs and the reader that carries its answers is alive (a
        reader that stopped would leave every call waiting for an answer never read)."""
        reader = self._reader
        return (
            not self._dead and self._process is not None and (reader is None or reader.is_alive())
        )

    def start(self) -> EngineInfo:
        """Start the process and wait until it serves (loaded and warm).

        Raises:
            LoadFailed, IntegrityFailure, ...: what the child reported, or its death.
        """
        ctx = mp_context()
        conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=child_main,
            args=(child_conn, self.spec),
            name=f"slimserve-engine-{self.spec.name}",
            daemon=True,
        )
        self._process.start()
        self._pid = self._process.pid
        child_conn.close()
        self._conn = conn
        decode = ipc.server_codec().decode
        frame = decode(self._wait_first_frame())
        if isinstance(frame, ipc.Failed):
            self._process.join(10)
            self._dead = True
            self.exit_code = self._process.exitcode
            self._release()
            raise frame.error
        assert isinstance(frame, ipc.Ready), frame
        self.info = frame.info
        self._progress = (time.monotonic(), 0.0)
        self._reader = threading.Thread(
            target=self._read,
            args=(decode,),
            name=f"slimserve-engine-reader-{self.spec.name}",
            daemon=True,
        )
        self._reader.start()
        return self.info

    def _wait_first_frame(self) -> bytes:
        assert self._conn is not None
        deadline = time.monotonic() + self.start_timeout_s
        while not self._conn.poll(0.1):
            if not self._process.is_alive():
                raise self._died_loading()
            if time.monotonic() > deadline:
                self._process.kill()
                self._process.join(5)
                self._dead = True
                self._release()
                raise LoadFailed(f"{self.spec.ref} did not load within {self.start_timeout_s} s")
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError):
            raise self._died_loading() from None

    def _died_loading(self) -> LoadFailed:
        self._process.join(5)
        self._dead = True
        self.exit_code = self._process.exitcode
        self._release()
        how = describe_exit(self.exit_code)
        return LoadFailed(f"the engine process for {self.spec.ref} died while loading ({how})")

    # ---- calls --------------------------------------------------------------------------
    def _send(self, frame: Any) -> None:
        if self._dead or self._conn is None:
            raise NotReady(f"the engine process for {self.spec.ref} is not running")
        try:
            with self._send_lock:
                self._conn.send_bytes(self._encoder.encode(frame))
        except OSError as exc:
            raise NotReady(f"the engine process for {self.spec.ref} is gone: {exc}") from exc

    def _check_open(self) -> None:
        if self._stopping:
            raise NotReady("the engine is shutting down")

    def submit(self, req: GenerationRequest, sink: Sink) -> RemoteHandle:
        """Queue a request; events go to `sink` on the reader thread (the first says it was
        accepted, or an error says why not: `Overloaded` when the engine's queue is full).

        Raises:
            NotReady: the process is not running.
        """
        self._check_open()
        rid = next(self._ids)
        self._sinks[rid] = sink
        try:
            self._send(ipc.Submit(rid=rid, request=req))
        except NotReady:
            self._sinks.pop(rid, None)
            raise
        return RemoteHandle(self, rid, req.request_id)

    def _cancel(self, rid: int) -> None:
        if rid in self._sinks and not self._dead:
            # A process that is gone has failed its requests already.
            with contextlib.suppress(NotReady):
                self._send(ipc.Cancel(rid=rid))

    def score(self, req: ScoreRequest) -> concurrent.futures.Future[ScoreResult]:
        self._check_open()
        return self._call(lambda cid: ipc.ScoreCall(cid=cid, request=req))

    def prompt_logprobs(
        self, prompt: Prompt, top_n: int = 0, deadline: float | None = None, limit: int = 0
    ) -> concurrent.futures.Future[list[TokenLogprob]]:
        self._check_open()
        return self._call(
            lambda cid: ipc.PromptLogprobsCall(
                cid=cid, prompt=prompt, top_n=top_n, deadline=deadline, limit=limit
            )
        )

    def tokenize(
        self, prompt: Prompt, limit: int = 0, *, tokens: bool = False
    ) -> concurrent.futures.Future[TokenizeResult]:
        self._check_open()
        return self._call(
            lambda cid: ipc.TokenizeCall(cid=cid, prompt=prompt, limit=limit, tokens=tokens)
        )

    def _call(self, frame: Callable[[int], Any]) -> concurrent.futures.Future[Any]:
        """Send a call answered by one frame; its future, which the caller may cancel (the
        job then leaves the engine's queue: `ipc.CancelCall`)."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        cid = next(self._ids)
        self._futures[cid] = fut
        try:
            self._send(frame(cid))
        except NotReady:
            self._futures.pop(cid, None)
            raise
        fut.add_done_callback(lambda f: self._abandoned(cid) if f.cancelled() else None)
        return fut

    def _abandoned(self, cid: int) -> None:
        if self._futures.pop(cid, None) is not None and not self._dead:
            with contextlib.suppress(NotReady):
                self._send(ipc.CancelCall(cid=cid))

    def stats(self) -> EngineStats:
        """The child's scheduler counters (a round trip; raises NotReady when it is down)."""
        stats: EngineStats = self._call(lambda cid: ipc.StatsCall(cid=cid)).result(10)
        return stats

    def occupancy(self) -> Occupancy:
        """What the process said with its latest step (no round trip; NotReady when down)."""
        if self._dead:
            raise NotReady(f"the engine process for {self.spec.ref} is not running")
        return self._occupancy

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the process: in-flight requests end CANCELLED, then it exits."""
        self._stopping = True  # before `_dead` is read: see `_died`
        if self._process is None:
            return
        if not self._dead:  # else the reader has seen the end and releases the process
            with contextlib.suppress(NotReady):
                self._send(ipc.Stop())
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(2)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(2)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(max(timeout, 2))
        if self._reader is None or not self._reader.is_alive():
            self._release()

    def kill(self, sig: int = signal.SIGKILL, why: str | None = None) -> None:
        """Send `sig` to the process (the watchdog, and tests exercising recovery); nothing
        once it is known dead (its pid may belong to another process by then). `why` is
        what the requests it fails are told."""
        if self._pid is not None and not self._dead:
            self._killed_why = why
            os.kill(self._pid, sig)

    def stalled_s(self) -> float:
        """How long the engine's current step has run, as far as the server can tell: the
        step time its last PROGRESS frame reported plus the time since that frame came (a
        process too stuck to send one counts as stalled for all that time)."""
        received, busy_s = self._progress
        since = time.monotonic() - received
        return busy_s + since if busy_s > 0 else since

    def _release(self) -> None:
        """Close the pipe and the process's handle (its sentinel pipe) now. A dead engine can
        stay referenced for a long while (a request's traceback holds it in a cycle) and
        must not hold three descriptors meanwhile: across restarts they would add up."""
        with self._release_lock:
            if self._released:
                return
            if self._conn is not None:
                self._conn.close()
            if self._process is not None and self._process.exitcode is not None:
                self._process.close()
                self._released = True

    # ---- the reader thread --------------------------------------------------------------
    def _read(self, decode: Callable[[bytes], Any]) -> None:
        """Answers from the process until its pipe closes. One frame that cannot be handled
        is logged and dropped; whatever ends this loop, the engine then counts as dead
        (`_died`), so the supervisor restarts it rather than leaving calls unanswered."""
        assert self._conn is not None
        try:
            while True:
                try:
                    data = self._conn.recv_bytes()
                except (EOFError, OSError):
                    break
                try:
                    self._dispatch(decode(data))
                except Exception:
                    log.exception("engine %s: a frame could not be handled; dropped", self.spec.ref)
        finally:
            self._died()

    def _dispatch(self, frame: Any) -> None:
        if isinstance(frame, ipc.Events):
            if frame.occupancy is not None:
                self._occupancy = frame.occupancy
            for rid, event in frame.items:
                try:
                    self._deliver(rid, event)
                except Exception:  # one stream's event must not cost the others theirs
                    log.exception("engine %s: an event could not be handled", self.spec.ref)
        elif isinstance(frame, ipc.CallFailed):
            fut = self._futures.pop(frame.cid, None)
            if fut is not None:
                settle(fut, exc=frame.error)
        elif isinstance(frame, ipc.Scored | ipc.Tokenized):
            self._answered(frame.cid, frame.result)
        elif isinstance(frame, ipc.PromptScored):
            self._answered(frame.cid, frame.logprobs)
        elif isinstance(frame, ipc.StatsReply):
            self._answered(frame.cid, frame.stats)
        elif isinstance(frame, ipc.Progress):
            self._progress = (time.monotonic(), frame.busy_s)

    def _deliver(self, rid: int, event: Event) -> None:
        last = event.finish is not None or event.error is not None
        sink = self._sinks.pop(rid, None) if last else self._sinks.get(rid)
        if sink is not None:
            sink(event)

    def _answered(self, cid: int, result: Any) -> None:
        fut = self._futures.pop(cid, None)
        if fut is not None:
            settle(fut, result)  # its caller may have cancelled it meanwhile

    def _died(self) -> None:
        self._dead = True
        self._process.join(5 if self._stopping else 1)  # a closed pipe: it is exiting
        if self._process.is_alive() and not self._stopping:
            # The reader stopped, not the process: end it, so it restarts.
            log.error("engine %s: its reader stopped; ending the process", self.spec.ref)
            self._process.kill()
            self._process.join(5)
        self.exit_code = self._process.exitcode
        if not self._stopping:  # else `shutdown` is joining the process: it releases it
            self._release()
        if self._stopping:
            error: Exception = NotReady("the engine is shutting down")
        else:
            how = describe_exit(self.exit_code)
            if self._killed_why is not None:
                how = f"was killed ({self._killed_why})"
            error = NotReady(
                f"the engine process serving {self.spec.ref} {how}; it is being restarted"
            )
            log.error("engine process for %s (pid %s) %s", self.spec.ref, self.pid, how)
        sinks, self._sinks = self._sinks, {}
        futures, self._futures = self._futures, {}
        for sink in sinks.values():
            try:
                sink(Event(error=error))
            except Exception:
                log.exception("engine %s: a request could not be told", self.spec.ref)
        for fut in futures.values():
            settle(fut, exc=error)
        if not self._stopping and self.on_exit is not None:
            self.on_exit(self, self.exit_code)
