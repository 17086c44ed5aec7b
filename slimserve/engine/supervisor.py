"""A model's engine process, restarted when it dies: the server's engine for that model.

`SupervisedEngine` answers the same calls as `scheduler.Engine`. When its process dies, the
requests in flight have already failed (`process.RemoteEngine`), the model's health turns
NOT_SERVING (`on_state(False)`), and a restart follows with exponential backoff; the model
serves again once the new process is warm (`on_state(True)`).

A watchdog thread reads the engine's heartbeat (`RemoteEngine.stalled_s`): a step that runs
past `step_timeout_s` (a hang in native code, a deadlock) gets the process killed, which
fails its requests and restarts it like any other death.

Only deaths that are the serving plan's own fault count as crashes: a fatal signal of its
code (`FAULT_SIGNALS`) or a hung step. An operator's SIGTERM or SIGKILL and the kernel's OOM
killer (a SIGKILL too) restart the engine but say nothing of the plan. `max_crashes` such
crashes within `crash_window_s` mark the plan bad (`on_crash_loop`, a verdict that expires),
and the next restart serves by the next qualified plan when the backend is `auto`. Imports
no grpc.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
import time
from collections.abc import Callable

from slimserve.engine.config import RestartConfig
from slimserve.engine.errors import NotReady
from slimserve.engine.process import (
    ChildSpec,
    RemoteEngine,
    RemoteHandle,
    describe_exit,
    progress_interval,
)
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

#: Signals that end a process for a fault of its own code: the plan's, not the operator's.
FAULT_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
)


def plan_fault(code: int | None) -> str | None:
    """The fault signal's name if exit `code` is a death by one, else None (an exit of its
    own, SIGKILL, SIGTERM, SIGINT...: an operator, an OOM kill or a shutdown)."""
    if code is None or code >= 0:
        return None
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return None
    return sig.name if sig in FAULT_SIGNALS else None


class SupervisedEngine:
    """One model's engine process and its restarts. Thread-safe."""

    def __init__(
        self,
        make_spec: Callable[[], ChildSpec],
        *,
        policy: RestartConfig | None = None,
        on_state: Callable[[bool], None] | None = None,
        on_crash_loop: Callable[[ChildSpec, str], None] | None = None,
    ) -> None:
        self.make_spec = make_spec
        self.policy = policy or RestartConfig()
        self.on_state = on_state
        self.on_crash_loop = on_crash_loop
        self.restarts = 0
        self.ref = ""
        self.info: EngineInfo
        self._current: RemoteEngine | None = None
        self._lock = threading.Lock()
        #: (when, how) of each crash of the plan's fault within the window.
        self._crashes: list[tuple[float, str]] = []
        self._last_exit = ""
        self._stopping = threading.Event()
        self._restarter: threading.Thread | None = None
        #: The engine the watchdog killed for a hung step (its death is then the plan's).
        self._hung: RemoteEngine | None = None
        self._watchdog: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> EngineInfo:
        """Start the first process (raises what its load raised: no restart for that)."""
        spec = self.make_spec()
        self.ref = spec.ref
        engine = RemoteEngine(spec, on_exit=self._exited)
        self.info = engine.start()
        self._current = engine
        if self.policy.step_timeout_s > 0:
            self._watchdog = threading.Thread(
                target=self._watch, name="slimserve-engine-watchdog", daemon=True
            )
            self._watchdog.start()
        return self.info

    @property
    def serving(self) -> bool:
        engine = self._current
        return engine is not None and engine.alive

    @property
    def pid(self) -> int | None:
        engine = self._current
        return engine.pid if engine is not None else None

    def kill(self, sig: int) -> None:
        """Signal the current process (operators and tests exercise recovery with it)."""
        engine = self._current
        if engine is None:
            raise NotReady("no engine process is running")
        engine.kill(sig)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._lock:
            engine, self._current = self._current, None
        if engine is not None:
            engine.shutdown(timeout)
        if self._restarter is not None and self._restarter is not threading.current_thread():
            self._restarter.join(timeout)

    # ---- calls --------------------------------------------------------------------------
    def _engine(self) -> RemoteEngine:
        engine = self._current
        if engine is None or not engine.alive:
            if self._stopping.is_set():
                raise NotReady("the engine is shutting down")
            raise NotReady(f"the engine for {self.ref} is restarting (it {self._last_exit})")
        return engine

    def submit(self, req: GenerationRequest, sink: Callable[[Event], None]) -> RemoteHandle:
        return self._engine().submit(req, sink)

    def score(self, req: ScoreRequest) -> concurrent.futures.Future[ScoreResult]:
        return self._engine().score(req)

    def prompt_logprobs(
        self, prompt: Prompt, top_n: int = 0, deadline: float | None = None, limit: int = 0
    ) -> concurrent.futures.Future[list[TokenLogprob]]:
        return self._engine().prompt_logprobs(prompt, top_n, deadline, limit)

    def tokenize(
        self, prompt: Prompt, limit: int = 0, *, tokens: bool = False
    ) -> concurrent.futures.Future[TokenizeResult]:
        return self._engine().tokenize(prompt, limit, tokens=tokens)

    def stats(self) -> EngineStats:
        return self._engine().stats()

    def occupancy(self) -> Occupancy:
        return self._engine().occupancy()

    # ---- the watchdog -------------------------------------------------------------------
    def _watch(self) -> None:
        limit = self.policy.step_timeout_s
        while not self._stopping.wait(progress_interval(limit)):
            engine = self._current
            if engine is None or not engine.alive or engine is self._hung:
                continue
            stalled = engine.stalled_s()
            if stalled > limit:
                log.error(
                    "engine for %s (pid %s): a step has run %.1f s, over the limit of %.0f s; "
                    "killing it to restart",
                    self.ref,
                    engine.pid,
                    stalled,
                    limit,
                )
                self._hung = engine
                engine.kill(signal.SIGKILL, why=f"a step ran over {limit:g} s")

    # ---- crashes ------------------------------------------------------------------------
    def _exited(self, engine: RemoteEngine, code: int | None) -> None:
        """Called on the dead engine's reader thread."""
        if self._stopping.is_set():
            return
        with self._lock:
            if self._current is engine:
                self._current = None
        if self.on_state is not None:
            self.on_state(False)
        how = describe_exit(code)
        if engine is self._hung:
            how = f"hung (a step ran over {self.policy.step_timeout_s:g} s)"
            self._crashed(engine.spec, how)
        elif plan_fault(code) is not None:
            self._crashed(engine.spec, how)
        else:  # an operator, the OOM killer or an exit of its own: restarted, not counted
            self._last_exit = how
            log.warning("engine for %s %s: restarting (not counted as a crash)", self.ref, how)
        self._restarter = threading.Thread(
            target=self._restart, name="slimserve-engine-restart", daemon=True
        )
        self._restarter.start()

    def _crashed(self, spec: ChildSpec, how: str) -> None:
        """Count a crash of the plan's fault (while serving or restarting); `max_crashes`
        within the window mark the plan bad."""
        self._last_exit = how
        now = time.monotonic()
        window = self.policy.crash_window_s
        with self._lock:
            self._crashes = [(t, h) for t, h in self._crashes if now - t < window]
            self._crashes.append((now, how))
            crashes = [h for _, h in self._crashes]
        if len(crashes) >= self.policy.max_crashes and self.on_crash_loop is not None:
            self.on_crash_loop(
                spec, f"{len(crashes)} crashes within {window:g} s: {'; '.join(crashes)}"
            )
            with self._lock:
                self._crashes.clear()

    def _restart(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            delay = min(self.policy.backoff_s * 2**attempt, self.policy.max_backoff_s)
            if self._stopping.wait(delay):
                return
            spec = self.make_spec()
            engine = RemoteEngine(spec, on_exit=self._exited)
            try:
                info = engine.start()
            except Exception as exc:
                attempt += 1
                log.error("restarting the engine for %s failed: %s", spec.ref, exc)
                code = engine.exit_code
                if plan_fault(code) is not None:  # it crashed again, loading or warming up
                    self._crashed(spec, describe_exit(code))
                continue
            with self._lock:
                if self._stopping.is_set():
                    engine.shutdown(2)
                    return
                self._current = engine
                self.info = info
                self.restarts += 1
            log.warning("engine for %s restarted (pid %s, %s)", spec.ref, engine.pid, info.kernels)
            if self.on_state is not None:
                self.on_state(True)
            return
