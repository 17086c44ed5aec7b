"""Persistent ggml threadpools for a llama.cpp context: a small ctypes binding.

llama.cpp built without OpenMP (Debian's clang has no libomp) computes each graph on a
threadpool; when the context has none attached, every `llama_decode` creates a throwaway
pool, starts its workers, and joins them at the end, and those workers poll for work with
the default `poll` of 50 (millions of `pause` instructions) before they sleep. On a
machine whose cores the server and its clients share, that spinning takes the core the
server needs to hand tokens out.

`ContextThreads` attaches pools of its own, made with `poll=0` (a worker sleeps on a
condition variable as soon as a graph is done; inside a graph ggml's barriers still spin)
and normal priority (`prio` >= MEDIUM is SCHED_FIFO: never beside spinning barriers). Two
thread counts by phase, as llama.cpp chooses them per ubatch (`graph_compute(gf,
ubatch.n_tokens > 1)`): a one-token ubatch (one sequence decoding) runs on
`decode_threads`, every larger one (prefill, a batched decode step, Score rows, a
speculative verification) on `threads`. Each count gets its own pool: a one-thread pool
has no workers at all, so a single-sequence decode wakes no other thread.

llama-cpp-python 0.3.36 binds `llama_set_n_threads` but none of `ggml_threadpool_*` nor
`llama_attach_threadpool`; `libggml-base.so`, `libggml-cpu.so` and `libllama.so` export
them. Hand-written, as no library binds them: the struct follows `ggml.h` of the llama.cpp
that llama-cpp-python 0.3.36 vendors, and `_Lib.check` reads a default-initialised struct
back before any pool is made, so a build whose layout differs is refused (served on
llama.cpp's own per-call pools) instead of handed a misread struct.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: ggml.h: GGML_MAX_N_THREADS, the length of `ggml_threadpool_params.cpumask`.
GGML_MAX_N_THREADS = 512
#: ggml.h: enum ggml_sched_priority.
GGML_SCHED_PRIO_NORMAL = 0
#: ggml.c `ggml_threadpool_params_init`: the default polling level, read back as a check.
_DEFAULT_POLL = 50


class ThreadpoolParams(ctypes.Structure):
    """`struct ggml_threadpool_params` (ggml.h)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS),  # all false: inherited affinity
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),  # enum ggml_sched_priority
        ("poll", ctypes.c_uint32),  # 0: no polling, 100: aggressive
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


@dataclass(frozen=True, slots=True)
class _Lib:
    """The bound functions (each `argtypes` / `restype` set), from the libraries
    llama-cpp-python loaded."""

    params_init: Any  # ggml_threadpool_params_init(params *, int)
    new: Any  # ggml_threadpool_new(params *) -> ggml_threadpool *
    free: Any  # ggml_threadpool_free(ggml_threadpool *)
    attach: Any  # llama_attach_threadpool(ctx, threadpool, threadpool_batch)
    detach: Any  # llama_detach_threadpool(ctx)

    def check(self) -> str | None:
        """Why this build's struct does not read as `ThreadpoolParams` (None: it does)."""
        p = ThreadpoolParams()
        ctypes.memset(ctypes.byref(p), 0xAB, ctypes.sizeof(p))
        self.params_init(ctypes.byref(p), 3)
        got = (p.n_threads, p.prio, p.poll, p.strict_cpu, p.paused, any(p.cpumask))
        want = (3, GGML_SCHED_PRIO_NORMAL, _DEFAULT_POLL, False, False, False)
        if got != want:
            return f"ggml_threadpool_params reads back as {got}, not {want}"
        return None


@functools.cache
def _bind() -> _Lib | str:
    """The bound library, or why it cannot be bound."""
    try:
        import llama_cpp.llama_cpp as lcpp
    except ImportError as exc:
        return f"llama-cpp-python is not importable: {exc}"
    llama = lcpp._lib
    libdir = Path(llama._name).parent
    try:
        # Already loaded as libllama's dependencies: the same handles, no second copy.
        base = ctypes.CDLL(str(libdir / "libggml-base.so"))
        cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"))
        lib = _Lib(
            params_init=base.ggml_threadpool_params_init,
            new=cpu.ggml_threadpool_new,
            free=cpu.ggml_threadpool_free,
            attach=llama.llama_attach_threadpool,
            detach=llama.llama_detach_threadpool,
        )
    except (OSError, AttributeError) as exc:
        return f"this llama.cpp build does not export ggml's threadpool: {exc}"
    lib.params_init.argtypes = [ctypes.POINTER(ThreadpoolParams), ctypes.c_int]
    lib.params_init.restype = None
    lib.new.argtypes = [ctypes.POINTER(ThreadpoolParams)]
    lib.new.restype = ctypes.c_void_p
    lib.free.argtypes = [ctypes.c_void_p]
    lib.free.restype = None
    lib.attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.attach.restype = None
    lib.detach.argtypes = [ctypes.c_void_p]
    lib.detach.restype = None
    return lib.check() or lib


def unavailable_reason() -> str | None:
    """Why persistent pools cannot be made with this llama.cpp (None: they can)."""
    lib = _bind()
    return lib if isinstance(lib, str) else None


def _lib() -> _Lib:
    lib = _bind()
    if isinstance(lib, str):
        raise RuntimeError(lib)
    return lib


class Threadpool:
    """One ggml threadpool of `n_threads` (the calling thread is its first: a pool of one
    starts no thread), polling `poll` (0: its workers sleep between graphs). `free` once
    nothing computes on it (idempotent).

    Raises:
        RuntimeError: this llama.cpp has no usable threadpool API, or ggml made none.
        ValueError: `n_threads` outside 1..GGML_MAX_N_THREADS, or `poll` outside 0..100.
    """

    def __init__(self, n_threads: int, *, poll: int = 0) -> None:
        if not 1 <= n_threads <= GGML_MAX_N_THREADS:
            raise ValueError(f"a threadpool needs 1..{GGML_MAX_N_THREADS} threads, not {n_threads}")
        if not 0 <= poll <= 100:
            raise ValueError(f"poll must be 0..100, not {poll}")
        lib = _lib()
        params = ThreadpoolParams()
        lib.params_init(ctypes.byref(params), n_threads)
        params.poll = poll
        params.prio = GGML_SCHED_PRIO_NORMAL
        self.n_threads = n_threads
        self.handle: int | None = lib.new(ctypes.byref(params))
        if not self.handle:
            raise RuntimeError(f"ggml_threadpool_new({n_threads} threads) failed")

    def free(self) -> None:
        if self.handle:
            _lib().free(self.handle)
            self.handle = None


class ContextThreads:
    """The thread counts by phase of one llama.cpp context and the pools attached to it.

    `decode_threads` run a one-token ubatch, `threads` every larger one. With `pooled`
    each count has a persistent pool (`Threadpool`, poll 0); without, llama.cpp makes a
    throwaway pool per call, as it does for a context nothing is attached to.

    A pool lives until `close`, which comes after `llama_free`: ggml's CPU backend keeps a
    pointer to the last pool it computed on and pauses it when the next graph runs on
    another, so a pool freed while its context lives would be touched after its free.
    Changing `decode_threads` back and forth therefore reuses the pools made so far.

    Raises:
        ValueError: a thread count below 1, or `decode_threads` above `threads`.
        RuntimeError: `pooled` and this llama.cpp cannot make pools (`unavailable_reason`).
    """

    def __init__(self, lc: Any, ctx: Any, *, threads: int, decode_threads: int, pooled: bool):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self.lc, self.ctx, self.pooled = lc, ctx, pooled
        self.threads = threads
        self.decode_threads = 0
        #: Thread count -> its pool, for the context's lifetime.
        self._pools: dict[int, Threadpool] = {}
        self.set_decode_threads(decode_threads)

    def set_decode_threads(self, decode_threads: int) -> None:
        """Run one-token ubatches on `decode_threads` from the next call on."""
        if not 1 <= decode_threads <= self.threads:
            raise ValueError(
                f"decode threads must be 1..threads ({self.threads}), not {decode_threads}"
            )
        if decode_threads == self.decode_threads:
            return
        self.lc.llama_set_n_threads(self.ctx, decode_threads, self.threads)
        if self.pooled:
            _lib().attach(self.ctx, self._pool(decode_threads), self._pool(self.threads))
        self.decode_threads = decode_threads

    def _pool(self, n: int) -> int | None:
        if n not in self._pools:
            self._pools[n] = Threadpool(n)
        return self._pools[n].handle

    def close(self) -> None:
        """Free the pools, after `llama_free` of the context (idempotent)."""
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.free()

    def describe(self) -> str:
        """E.g. "decode 1 of 2 threads, persistent pools (poll 0)"."""
        pool = "persistent pools (poll 0)" if self.pooled else "a pool per call"
        return f"decode {self.decode_threads} of {self.threads} threads, {pool}"
