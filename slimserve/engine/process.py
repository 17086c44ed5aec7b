"""One served model's engine in a child process, and the server's handle on it.

The child (`child_main`) verifies and loads the artifact, builds the backend, runs the
scheduler and answers frames (`slimserve.engine.ipc`) on a pipe. The server holds a
`RemoteEngine`: the same calls as `scheduler.Engine` (submit, score, stats, shutdown), and
a reader thread that turns frames back into events. Native code that crashes (SIGSEGV,
abort, an OOM kill) takes only the child: the reader sees the pipe close, every request in
flight ends at once with `NotReady` naming the model and the signal, and `on_exit` tells
the supervisor. Children fork from a forkserver that has torch and llama_cpp imported,
so a start costs the model load, not the imports. Imports no grpc.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
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
from slimserve.engine.errors import LoadFailed, NotReady, Overloaded
from slimserve.engine.futures import settle
from slimserve.engine.ipc import Tag
from slimserve.engine.types import (
    EngineInfo,
    EngineStats,
    Event,
    GenerationRequest,
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
    config: dict[str, Any]
    #: The plan to serve; None = the static choice (`select.plans_for`'s first).
    plan: dict[str, Any] | None = None
    refused: dict[str, str] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)
    threads: int = 0
    log_level: int = logging.WARNING

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**{**d, "backend_plugins": tuple(d.get("backend_plugins", ()))})


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

    from slimserve.engine.loader import load, resolve_draft
    from slimserve.registry.store import Registry

    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s engine[{spec.ref} pid %(process)d] %(levelname)s %(name)s: "
        "%(message)s",
    )
    if spec.threads:
        torch.set_num_threads(spec.threads)
    lock = threading.Lock()

    def send(*frame: Any) -> None:
        data = ipc.pack(*frame)
        with lock:
            conn.send_bytes(data)

    try:
        artifact = Registry(Path(spec.registry)).get(spec.name, str(spec.version))
        plan = Plan.from_dict(spec.plan) if spec.plan else None
        config = model_config_from_dict(spec.config)
        draft = resolve_draft(Path(spec.registry), config)
        loaded = load(artifact, config, plan=plan, refused=spec.refused, draft=draft)
    except BaseException as exc:
        send(Tag.FAILED, ipc.error_to_wire(exc))
        return
    # A dead scheduler loop ends the process, so the supervisor restarts it.
    loaded.engine.on_failure = lambda _exc: os._exit(70)  # type: ignore[attr-defined]
    info = dataclasses.replace(loaded.info, in_process=False, measured=dict(spec.measured))
    send(Tag.READY, info.to_dict())
    if config.engine_step_timeout_s > 0:
        interval = progress_interval(config.engine_step_timeout_s)
        threading.Thread(
            target=_heartbeat, args=(loaded.engine, send, interval), daemon=True
        ).start()
    _serve(conn, loaded.engine, send)


def _heartbeat(engine: Any, send: Callable[..., None], interval: float) -> None:
    """Tell the server, every `interval` s, how long the current step has run. A step stuck
    in native code that holds the GIL stops these frames too: silence counts as stuck."""
    while True:
        time.sleep(interval)
        started = engine.step_started
        try:
            send(Tag.PROGRESS, time.monotonic() - started if started is not None else 0.0)
        except OSError:
            return  # the server is gone


def _serve(conn: Connection, engine: Any, send: Callable[..., None]) -> None:
    bridge = _Bridge(engine, send)
    engine.on_flush = bridge.flush
    while True:
        try:
            frame = ipc.unpack(conn.recv_bytes())
        except (EOFError, OSError):
            break  # the server is gone: stop serving
        tag = frame[0]
        if tag == Tag.SUBMIT:
            bridge.submit(frame[1], frame[2])
        elif tag == Tag.CANCEL:
            handle = bridge.handles.get(frame[1])
            if handle is not None:
                handle.cancel()
        elif tag == Tag.SCORE:
            bridge.score(frame)
        elif tag == Tag.PROMPT_LOGPROBS:
            bridge.prompt_logprobs(frame)
        elif tag == Tag.CANCEL_CALL:
            bridge.cancel_call(frame[1])
        elif tag == Tag.STATS:
            send(Tag.STATS_REPLY, frame[1], ipc.stats_to_wire(engine.stats()))
        elif tag == Tag.STOP:
            break
    engine.shutdown()


class _Bridge:
    """The engine process's side of the pipe: requests in, events out.

    Events wait in `pending` (on the worker thread) until the end of the step's phase, then
    cross in one frame: one wake-up of the server per step, not one per stream.
    """

    def __init__(self, engine: Any, send: Callable[..., None]) -> None:
        self.engine = engine
        self.send = send
        self.handles: dict[int, Any] = {}
        #: Score / prompt-logprob jobs in the engine, by the server's call id.
        self.calls: dict[int, concurrent.futures.Future[Any]] = {}
        self.pending: list[list[Any]] = []

    def flush(self) -> None:
        if self.pending:
            batch = self.pending[:]
            self.pending.clear()
            self.send(Tag.EVENTS, batch)

    def submit(self, rid: int, wire: dict[str, Any]) -> None:
        def sink(ev: Event) -> None:  # on the engine's worker thread
            if ev.error is not None:
                self.handles.pop(rid, None)
                self.pending.append([rid, Tag.ERROR, ipc.error_to_wire(ev.error)])
                return
            if ev.finish is not None:
                self.handles.pop(rid, None)
            self.pending.append([rid, Tag.EVENT, ipc.event_to_wire(ev)])

        try:
            self.handles[rid] = self.engine.submit(ipc.request_from_wire(wire), sink)
        except Exception as exc:
            self.send(Tag.ERROR, rid, ipc.error_to_wire(exc))

    def score(self, frame: list[Any]) -> None:
        _, sid, prompt, conts, deadline = frame
        self._answer(sid, lambda: self.engine.score(prompt, conts, deadline), lambda r: r)

    def prompt_logprobs(self, frame: list[Any]) -> None:
        _, sid, prompt, top_n, deadline = frame
        self._answer(
            sid,
            lambda: self.engine.prompt_logprobs(prompt, top_n, deadline),
            ipc.logprobs_to_wire,
        )

    def cancel_call(self, sid: int) -> None:
        """The server's caller gave up: the job leaves the queue before its next chunk."""
        fut = self.calls.pop(sid, None)
        if fut is not None:
            fut.cancel()

    def _answer(
        self,
        sid: int,
        call: Callable[[], concurrent.futures.Future[Any]],
        wire: Callable[[Any], Any],
    ) -> None:
        def done(fut: concurrent.futures.Future[Any]) -> None:
            self.calls.pop(sid, None)
            if fut.cancelled():
                return  # cancelled at the server's word: it expects no answer
            exc = fut.exception()
            if exc is not None:
                self.send(Tag.SCORE_FAILED, sid, ipc.error_to_wire(exc))
            else:
                self.send(Tag.SCORED, sid, wire(fut.result()))

        try:
            fut = call()
        except Exception as exc:
            self.send(Tag.SCORE_FAILED, sid, ipc.error_to_wire(exc))
            return
        self.calls[sid] = fut
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
    """An engine process, driven like an in-process `Engine`. Thread-safe."""

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
        self._ids = itertools.count(1)
        self._sinks: dict[int, Sink] = {}
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}
        self._stopping = False
        self._dead = False
        self._reader: threading.Thread | None = None
        self._released = False
        self._killed_why: str | None = None
        self._release_lock = threading.Lock()
        self._max_queue = int(spec.config.get("max_queue", 64))

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
        frame = self._wait_first_frame()
        if frame[0] == Tag.FAILED:
            self._process.join(10)
            self._dead = True
            self.exit_code = self._process.exitcode
            self._release()
            raise ipc.error_from_wire(frame[1])
        self.info = EngineInfo.from_dict(frame[1])
        self._progress = (time.monotonic(), 0.0)
        self._reader = threading.Thread(
            target=self._read, name=f"slimserve-engine-reader-{self.spec.name}", daemon=True
        )
        self._reader.start()
        return self.info

    def _wait_first_frame(self) -> list[Any]:
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
            return ipc.unpack(self._conn.recv_bytes())
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
    def _send(self, *frame: Any) -> None:
        if self._dead or self._conn is None:
            raise NotReady(f"the engine process for {self.spec.ref} is not running")
        data = ipc.pack(*frame)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except OSError as exc:
            raise NotReady(f"the engine process for {self.spec.ref} is gone: {exc}") from exc

    def submit(self, req: GenerationRequest, sink: Sink) -> RemoteHandle:
        """Queue a request; events go to `sink` on the reader thread.

        Raises:
            Overloaded: the admission queue is full (checked here, before the pipe).
            NotReady: the process is not running.
        """
        if self._stopping:
            raise NotReady("the engine is shutting down")
        if len(self._sinks) >= self._max_queue + self.info.backend.max_slots:
            raise Overloaded(
                f"admission queue full ({self._max_queue} waiting, "
                f"{self.info.backend.max_slots} running); retry later"
            )
        rid = next(self._ids)
        self._sinks[rid] = sink
        try:
            self._send(Tag.SUBMIT, rid, ipc.request_to_wire(req))
        except NotReady:
            self._sinks.pop(rid, None)
            raise
        return RemoteHandle(self, rid, req.request_id)

    def _cancel(self, rid: int) -> None:
        if rid in self._sinks and not self._dead:
            # A process that is gone has failed its requests already.
            with contextlib.suppress(NotReady):
                self._send(Tag.CANCEL, rid)

    def score(
        self,
        prompt_ids: list[int],
        continuations: list[list[int]],
        deadline: float | None = None,
    ) -> concurrent.futures.Future[list[float]]:
        if self._stopping:
            raise NotReady("the engine is shutting down")
        if sum(1 for f in self._futures.values() if not f.done()) >= self._max_queue:
            raise Overloaded(f"score queue full ({self._max_queue}); retry later")
        return self._call(Tag.SCORE, prompt_ids, continuations, deadline)

    def prompt_logprobs(
        self, prompt_ids: list[int], top_n: int = 0, deadline: float | None = None
    ) -> concurrent.futures.Future[list[TokenLogprob]]:
        if self._stopping:
            raise NotReady("the engine is shutting down")
        raw = self._call(Tag.PROMPT_LOGPROBS, prompt_ids, top_n, deadline)
        out: concurrent.futures.Future[list[TokenLogprob]] = concurrent.futures.Future()

        def convert(fut: concurrent.futures.Future[Any]) -> None:
            if fut.cancelled():
                out.cancel()
            elif (exc := fut.exception()) is not None:
                settle(out, exc=exc)
            else:
                settle(out, ipc.logprobs_from_wire(fut.result()))

        raw.add_done_callback(convert)
        out.add_done_callback(lambda f: raw.cancel() if f.cancelled() else None)
        return out

    def _call(self, tag: Tag, *args: Any) -> concurrent.futures.Future[Any]:
        """Send a call answered by one frame; its future, which the caller may cancel (the
        job then leaves the engine's queue: `Tag.CANCEL_CALL`)."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        qid = next(self._ids)
        self._futures[qid] = fut
        try:
            self._send(tag, qid, *args)
        except NotReady:
            self._futures.pop(qid, None)
            raise
        fut.add_done_callback(lambda f: self._abandoned(qid) if f.cancelled() else None)
        return fut

    def _abandoned(self, qid: int) -> None:
        if self._futures.pop(qid, None) is not None and not self._dead:
            with contextlib.suppress(NotReady):
                self._send(Tag.CANCEL_CALL, qid)

    def stats(self) -> EngineStats:
        """The child's scheduler counters (a round trip; raises NotReady when it is down)."""
        result: dict[str, Any] = self._call(Tag.STATS).result(10)
        return ipc.stats_from_wire(result)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the process: in-flight requests end CANCELLED, then it exits."""
        self._stopping = True  # before `_dead` is read: see `_died`
        if self._process is None:
            return
        if not self._dead:  # else the reader has seen the end and releases the process
            with contextlib.suppress(NotReady):
                self._send(Tag.STOP)
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
    def _read(self) -> None:
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
                    self._dispatch(ipc.unpack(data))
                except Exception:
                    log.exception("engine %s: a frame could not be handled; dropped", self.spec.ref)
        finally:
            self._died()

    def _dispatch(self, frame: list[Any]) -> None:
        tag = frame[0]
        if tag == Tag.EVENTS:
            for rid, kind, payload in frame[1]:
                try:
                    self._dispatch([kind, rid, payload])
                except Exception:  # one stream's event must not cost the others theirs
                    log.exception("engine %s: an event could not be handled", self.spec.ref)
        elif tag == Tag.EVENT:
            event = ipc.event_from_wire(frame[2])
            sink = self._sinks.pop(frame[1], None) if event.finish else self._sinks.get(frame[1])
            if sink is not None:
                sink(event)
        elif tag == Tag.ERROR:
            sink = self._sinks.pop(frame[1], None)
            if sink is not None:
                sink(Event(error=ipc.error_from_wire(frame[2])))
        elif tag in (Tag.SCORED, Tag.STATS_REPLY):
            fut = self._futures.pop(frame[1], None)
            if fut is not None:
                settle(fut, frame[2])  # its caller may have cancelled it meanwhile
        elif tag == Tag.SCORE_FAILED:
            fut = self._futures.pop(frame[1], None)
            if fut is not None:
                settle(fut, exc=ipc.error_from_wire(frame[2]))
        elif tag == Tag.PROGRESS:
            self._progress = (time.monotonic(), float(frame[1]))

    def _died(self) -> None:
        self._dead = True
        self._process.join(1)  # a killed process closes its pipe just before it is reaped
        if self._process.is_alive():  # the reader stopped, not the process: end it
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
