"""A model's engine process, restarted when it dies: the server's engine for that model.

`SupervisedEngine` answers the same calls as `scheduler.Engine`. When its process dies, the
requests in flight have already failed (`process.RemoteEngine`), the model's health turns
NOT_SERVING (`on_state(False)`), and a restart follows with exponential backoff; the model
serves again once the new process is warm (`on_state(True)`). Crashing `max_crashes` times
within `crash_window_s` marks the serving plan bad (`on_crash_loop`), and the next restart
serves by the next qualified plan when the backend is `auto`. Imports no grpc.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

from slimserve.engine.config import RestartConfig
from slimserve.engine.errors import NotReady
from slimserve.engine.process import ChildSpec, RemoteEngine, RemoteHandle, describe_exit
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
        self._crashes: list[float] = []
        self._last_exit = ""
        self._stopping = threading.Event()
        self._restarter: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> EngineInfo:
        """Start the first process (raises what its load raised: no restart for that)."""
        spec = self.make_spec()
        self.ref = spec.ref
        engine = RemoteEngine(spec, on_exit=self._exited)
        self.info = engine.start()
        self._current = engine
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
        self._crashed(engine.spec, describe_exit(code))
        self._restarter = threading.Thread(
            target=self._restart, name="slimserve-engine-restart", daemon=True
        )
        self._restarter.start()

    def _crashed(self, spec: ChildSpec, how: str) -> None:
        """Count a crash (while serving or while restarting); a loop marks the plan bad."""
        self._last_exit = how
        now = time.monotonic()
        with self._lock:
            self._crashes = [t for t in self._crashes if now - t < self.policy.crash_window_s]
            self._crashes.append(now)
            crashes = len(self._crashes)
        if crashes >= self.policy.max_crashes and self.on_crash_loop is not None:
            window = self.policy.crash_window_s
            self.on_crash_loop(spec, f"{crashes} crashes within {window:.0f} s, the last {how}")
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
                if code is not None:  # it died again: a crash like any other
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
