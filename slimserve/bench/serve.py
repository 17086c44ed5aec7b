"""`slimserve bench serve`: streaming latency and throughput, side by side in one run.

Every system runs in its own process on the same thread count: slimserve as a real server
driven over gRPC by an asyncio load generator on one channel for the whole run
(`slimserve_draft`: the same server with a speculative drafter; `slimserve_http`: its
OpenAI door through the openai SDK; `slimserve_nopool`: llama.cpp's per-call threadpool and
every pass on all threads, what the server did before persistent pools and threads by
phase), llama.cpp's own `llama-server` through the same openai SDK (`llama_server`,
`slimserve.bench.llama_server`), and the in-process baselines through
`slimserve.bench.worker`. slimserve's systems all serve the plan `serve` qualified on this
machine (`slimserve.bench.served`), with the same KV layout. Runs are interleaved (repeat →
concurrency → system), so a noisy neighbour slows every system alike; figures are medians
over repeats, percentiles over all requests. The load average before each run is
recorded. A system that fails records its error; the others still run. `mixed` is a
scenario of its own, after the race (`slimserve.bench.mixed`).

After the race, the chat probe times one-token chat requests on new user messages on each
server, then on llama-cpp-python's `Llama.create_chat_completion` in a worker of its own
(CHAT_PEER, on the same GGUF and threads, timed in its process): slimserve's p50 over gRPC
and over HTTP is held against that one (`chat_targets`).

Memory is measured from outside, alike for every system: the summed RSS and PSS of the
system's process and every descendant (engine processes, their forkserver), sampled during
each run. RSS counts a page that a forked engine shares with its forkserver once per
process; PSS divides it among them, so the memory target is judged on PSS. MB = 10^6 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from slimserve.bench.worker import stream_tokens
from slimserve.engine.machine import CpuInfo

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works, step by step.",
    "List ten facts about the planet Mars.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main causes of inflation?",
    "Give me a recipe for a simple tomato soup.",
    "Summarise the plot of a detective novel you invent.",
    "Explain the difference between TCP and UDP.",
    "Write a poem about autumn leaves.",
    "How do vaccines train the immune system?",
    "Describe a day in the life of a software engineer.",
    "What should I pack for a week of hiking?",
    "Explain recursion with an example in Python.",
    "Why do cats purr? Give several theories.",
    "Write a product description for a reusable water bottle.",
    "How does a bill become a law?",
]
#: Systems served by `slimserve serve` (driven over gRPC; `slimserve_http` over its OpenAI
#: door through the openai SDK).
SERVER_SYSTEMS = ("slimserve", "slimserve_draft", "slimserve_http", "slimserve_nopool")
#: In-process systems (`slimserve.bench.worker`).
WORKER_SYSTEMS = ("engine", "engine_nopool", "engine_ipc", "hf_generate")
#: llama.cpp's own loop on the shipped Q4_1 file and on its Q8_0 re-encode.
LLAMACPP_SYSTEMS = ("llama_cpp", "llama_cpp_q8")
#: llama.cpp's own server on the weights slimserve serves.
LLAMA_SERVER = "llama_server"
#: The mixed-load scenario (streams, long prompts, a Score), run after the race.
MIXED = "mixed"
#: The prefix-cache scenario (a shared document against new ones), run after the race.
PREFIX = "prefix"
BEST_LLAMACPP = "best llama.cpp"
SYSTEMS = (*SERVER_SYSTEMS, *WORKER_SYSTEMS, *LLAMACPP_SYSTEMS, LLAMA_SERVER, MIXED, PREFIX)
#: Systems raced at each concurrency (every one but the scenarios).
RACED = tuple(s for s in SYSTEMS if s not in (MIXED, PREFIX))
#: Systems with the persistent ggml threadpool and threads by phase off (the "before").
NO_POOL = ("slimserve_nopool", "engine_nopool")
#: One-token chat requests timed per OpenAI or gRPC server (the first-token probe).
CHAT_PROBE = 30
#: The servers the chat probe times.
CHAT_PROBED = ("slimserve", "slimserve_http", "slimserve_nopool", LLAMA_SERVER)
#: The chat probe's in-process peer: llama-cpp-python's `Llama.create_chat_completion` on
#: the GGUF slimserve serves, in a worker of its own (`worker.LlamaCppChat`).
CHAT_PEER = "llama_cpp_python"
#: (server, how it is reached): held against CHAT_PEER's p50 by `chat_targets`.
CHAT_TARGET_SYSTEMS = (("slimserve", "gRPC"), ("slimserve_http", "HTTP"))
#: A served one-token chat request's p50 at most this many times CHAT_PEER's.
CHAT_TARGET = 1.3
#: Peak PSS of slimserve's serving processes (server, engine process, forkserver), MB.
PSS_TARGET_MB = 1000.0
#: CPU flags shown beside the figures: the kernels that exist for this model depend on them.
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16")


@dataclass
class Sample:
    """One system's run at one concurrency in one repeat (`error` set when it failed)."""

    system: str
    concurrency: int
    repeat: int
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    #: Peak summed RSS and PSS of the system's processes, sampled during this run, MB.
    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0
    #: Summed VmHWM of those processes after the run: includes loading, double counts.
    hwm_rss_mb: float = 0.0
    load_before: float = 0.0
    #: prompt -> {"token_ids": [...], "text": "..."} (greedy), at concurrency 1 only.
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str = ""


@dataclass
class Bench:
    registry: Path
    model: str
    threads: int
    new_tokens: int
    concurrency: list[int]
    repeats: int
    systems: list[str]
    gguf: Path | None
    max_batch: int
    gguf_q8: Path | None = None
    #: slimserve's serving backend (`serve --backend`), for slimserve and engine alike.
    backend: str = "auto"
    #: llama.cpp backend weight format (`serve --gguf-type`).
    gguf_type: str = "auto"
    #: The version hf_generate runs (default: `model`), e.g. the fp32 parent of an int8 model.
    hf_model: str | None = None
    #: `serve --draft` of slimserve_draft: "ngram" or a draft model's NAME@REF.
    draft: str = "ngram"
    #: `serve --draft-tokens`: tokens drafted per verification step.
    draft_tokens: int = 4
    #: `serve --kv-layout` of slimserve, slimserve_draft and the engine.
    kv_layout: str = "auto"
    #: Threads of a one-token pass for slimserve and the in-process engine (as `serve
    #: --decode-threads`); 0: what qualification measured fastest.
    decode_threads: int = 0
    #: Where slimserve, the engine and hf_generate run (`serve --device`); llama.cpp's own
    #: loop runs on the CPU whatever it says.
    device: str = "cpu"
    #: llama_server: the binary, and the GGUF (+ chat template) slimserve's backend serves.
    llama_server: Path | None = None
    served_gguf: Path | None = None
    chat_template: Path | None = None
    #: Time CHAT_PEER (llama-cpp-python in-process on `served_gguf`) beside the servers in
    #: the chat probe.
    chat_peer: bool = False
    #: Each prompt's token ids (the OpenAI systems send ids: both servers see the same).
    prompt_ids: dict[str, list[int]] = field(default_factory=dict)
    #: One-token chat requests timed on each server system and CHAT_PEER (0: no probe).
    chat_probe: int = CHAT_PROBE
    #: The mixed scenario's running streams, and its long prompts' tokens.
    mixed_streams: int = 2
    mixed_long_tokens: int = 1300
    #: Also run the mixed scenario on a server that feeds prompts whole (the baseline its
    #: long prompts' TTFT is judged against).
    mixed_baseline: bool = True
    #: The prefix scenario's shared document, in tokens.
    prefix_tokens: int = 1000
    samples: list[Sample] = field(default_factory=list)

    @property
    def stream_tokens(self) -> int:
        """Tokens every system holds per stream (`worker.stream_tokens`)."""
        return stream_tokens(self.new_tokens)


def prompts_for(repeat: int, concurrency: int) -> list[str]:
    """The prompts of one run; the start moves with the repeat, so concurrency 1 sees a
    different prompt in each repeat (every system the same one)."""
    return [PROMPTS[(repeat + i) % len(PROMPTS)] for i in range(concurrency)]


# --- memory --------------------------------------------------------------------------------


def _tree(pid: int) -> list[Any]:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_memory_mb(procs: list[Any]) -> tuple[float, float]:
    """(RSS, PSS) summed over `procs` (psutil processes; PSS from /proc/PID/smaps_rollup),
    MB. A process that ended meanwhile counts 0."""
    import psutil

    rss = pss = 0
    for proc in procs:
        try:
            mem = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        rss += mem.rss
        pss += mem.pss
    return rss / 1e6, pss / 1e6


def tree_hwm_mb(pid: int) -> float:
    """Summed peak RSS (VmHWM) of `pid` and every descendant, MB: an upper bound."""
    total = 0.0
    for proc in _tree(pid):
        with contextlib.suppress(OSError):  # ended meanwhile
            for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if ln.startswith("VmHWM:"):
                    total += int(ln.split()[1]) * 1024 / 1e6
    return total


class PeakMemory:
    """Peak summed RSS and PSS of a process tree, sampled on a thread inside `with`.

    The tree is re-read every `rescan` samples (walking /proc for children costs more than
    reading the members' smaps_rollup)."""

    def __init__(self, pid: int, interval_s: float = 0.1, rescan: int = 10) -> None:
        self.pid, self.interval_s, self.rescan = pid, interval_s, rescan
        self.rss_mb = self.pss_mb = 0.0
        self._procs: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._failure: BaseException | None = None

    def sample(self, rescan: bool = True) -> None:
        if rescan or not self._procs:
            self._procs = _tree(self.pid)
        rss, pss = tree_memory_mb(self._procs)
        self.rss_mb, self.pss_mb = max(self.rss_mb, rss), max(self.pss_mb, pss)

    def _loop(self) -> None:
        try:
            for n in itertools.count(1):
                if self._stop.wait(self.interval_s):
                    return
                self.sample(rescan=n % self.rescan == 0)
        except BaseException as exc:  # re-raised by __exit__ on the caller's thread
            self._failure = exc

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        self.sample()


# --- the systems ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _last_line(log: IO[str]) -> str:
    log.seek(0)
    lines = [ln.strip() for ln in log.read().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _System(Protocol):
    served: str

    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]: ...

    def close(self) -> None: ...


class _Process:
    """A system's process, its output kept in a file for the error message."""

    def __init__(self, cmd: list[str], *, pipes: bool) -> None:
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the process
        pipe = subprocess.PIPE if pipes else None
        self.proc = subprocess.Popen(
            cmd, stdin=pipe, stdout=pipe if pipes else self.log, stderr=self.log, text=True,
            bufsize=1,
        )  # fmt: skip
        self.served = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exited(self) -> RuntimeError:
        return RuntimeError(f"exited with {self.proc.wait()}: {_last_line(self.log)}")

    def close(self) -> None:
        """A worker ends at the end of its input (stopping its engine process itself); a
        server, or a worker that does not, on SIGTERM; SIGKILL after 60 s."""
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        if self.alive():
            self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


class _Worker(_Process):
    """A `slimserve.bench.worker` process: `system` is one of its systems."""

    def __init__(self, system: str, b: Bench) -> None:
        cmd = [
            sys.executable, "-m", "slimserve.bench.worker", system,
            "--registry", str(b.registry),
            "--model", (b.hf_model or b.model) if system == "hf_generate" else b.model,
            "--threads", str(b.threads), "--max-batch", str(b.max_batch),
            "--backend", b.backend, "--gguf-type", b.gguf_type,
            "--stream-tokens", str(b.stream_tokens), "--kv-layout", b.kv_layout,
            "--device", b.device,
        ]  # fmt: skip
        if system in NO_POOL:
            cmd += ["--no-ggml-threadpool"]
        elif b.decode_threads:
            cmd += ["--decode-threads", str(b.decode_threads)]
        gguf = {"llama_cpp_q8": b.gguf_q8, PEER_WORKER: b.served_gguf}.get(system, b.gguf)
        if gguf is not None:
            cmd += ["--gguf", str(gguf)]
        if system == PEER_WORKER and b.chat_template is not None:
            cmd += ["--chat-template", str(b.chat_template)]
        super().__init__(cmd, pipes=True)
        try:
            self.served = str(self._read().get("served", system))
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise self.exited()
        out: dict[str, Any] = json.loads(line)
        return out

    def _ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        return self._read()

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        return self._ask({"prompts": prompts, "new_tokens": new_tokens})

    def chat_probe(self, n: int) -> dict[str, Any]:
        """The worker's one-token chat probe, timed in its own process.

        Raises:
            RuntimeError: the worker answered an error.
        """
        out = self._ask({"chat_probe": n})
        if "error" in out:
            raise RuntimeError(out["error"])
        return out


#: The worker system that runs CHAT_PEER.
PEER_WORKER = "llama_cpp_python_chat"


class _Server(_Process):
    """`slimserve serve` driven by one client for its whole life: one event loop and one
    gRPC channel (one openai connection pool for `slimserve_http`), so no run pays for a
    connection."""

    def __init__(
        self,
        b: Bench,
        system: str = "slimserve",
        *,
        max_seq_len: int = 0,
        max_batch: int = 0,
        extra: Sequence[str] = (),
    ) -> None:
        self.port = _free_port()
        self.http_port = _free_port() if system in ("slimserve_http", MIXED) else None
        cmd = [
            sys.executable, "-m", "slimserve.cli", "serve", "--model", b.model,
            "--registry", str(b.registry), "--port", str(self.port),
            "--threads", str(b.threads), "--max-batch", str(max_batch or b.max_batch),
            "--max-seq-len", str(max_seq_len or b.stream_tokens), "--device", b.device,
            "--backend", b.backend, "--gguf-type", b.gguf_type, "--kv-layout", b.kv_layout,
        ]  # fmt: skip
        if system == "slimserve_draft":
            cmd += ["--draft", b.draft, "--draft-tokens", str(b.draft_tokens)]
        if system in NO_POOL:
            cmd += ["--no-ggml-threadpool", "--decode-threads", str(b.threads)]
        elif b.decode_threads:
            cmd += ["--decode-threads", str(b.decode_threads)]
        if self.http_port is not None:
            cmd += ["--http-port", str(self.http_port)]
        super().__init__([*cmd, *extra], pipes=False)
        self.system = system
        self.model = b.model
        self._runner = asyncio.Runner()
        self._client: Any = None
        self.openai: Any = None
        try:
            self.served = self._wait_ready(600)
            if self.http_port is not None:
                from slimserve.bench.http_load import OpenAIDriver

                base = f"http://127.0.0.1:{self.http_port}/v1"
                self.openai = OpenAIDriver(base, b.model, b.prompt_ids)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> str:
        """What serves the figures, "<name>@<version> on <backend> [plan]", once SERVING.

        Raises RuntimeError (with the server's last line) when it exits first."""
        from slimserve.clients import Client, Unavailable

        deadline = time.monotonic() + timeout_s
        with Client(self.target, retries=0) as c:
            while True:
                if not self.alive():
                    raise self.exited()
                try:
                    c.wait_ready(2)
                    break
                except Unavailable:
                    if time.monotonic() > deadline:
                        raise
            info = c.model_info()
        threads = info.measured.get("decode_threads")
        decode = f", single-sequence decode on {threads:.0f} threads" if threads else ""
        return f"{info.ref} on {info.backend} [{info.plan}] ({info.kernels}{decode})"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> Any:
        """The run's one gRPC client (made on the runner's loop)."""
        if self._client is None:
            from slimserve.clients import AsyncClient

            self._client = AsyncClient(self.target, timeout=600, retries=0)
        return self._client

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        if self.openai is not None and self.system == "slimserve_http":
            out: dict[str, Any] = self.openai.run(prompts, new_tokens)
            return out
        return self._runner.run(self._run(prompts, new_tokens))

    async def _run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        from slimserve.bench.worker import record

        client = self.client()

        async def one(prompt: str, t0: float) -> dict[str, Any]:
            times: list[float] = []
            ids: list[int] = []
            text: list[str] = []
            async for chunk in client.stream(
                prompt, max_new_tokens=new_tokens, ignore_eos=True, token_ids=True
            ):
                # A verified draft streams several tokens in one message.
                times.extend([time.perf_counter()] * len(chunk.token_ids))
                ids.extend(chunk.token_ids)
                text.append(chunk.text)
            return record(t0, times, ids, "".join(text))

        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one(p, t0) for p in prompts))
        wall = time.perf_counter() - t0
        return {"runs": list(runs), "wall_s": wall}

    def chat_probe(self, n: int) -> dict[str, float]:
        """One-token chat requests on a new user message each, one after another: over
        the OpenAI door for `slimserve_http`, else over gRPC; latency percentiles, ms."""
        if self.openai is not None and self.system == "slimserve_http":
            out: dict[str, float] = self.openai.chat_probe(n)
            return out
        return self._runner.run(self._chat_probe(n))

    async def _chat_probe(self, n: int) -> dict[str, float]:
        from slimserve.bench.http_load import chat_question, timed_probe
        from slimserve.clients import ChatMessage

        client = self.client()

        async def one(i: int) -> None:
            await client.generate([ChatMessage("user", chat_question(i))], max_new_tokens=1)

        return await timed_probe(one, n)

    def call(self, coro: Any) -> Any:
        """Run `coro` on the server's loop (where its client lives)."""
        return self._runner.run(coro)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._client is not None:
                self._runner.run(self._client.close())
            self._client = None
            if self.openai is not None:
                self.openai.close()
        self._runner.close()
        super().close()

    def score_latency(self, n: int, concurrency: int) -> dict[str, float]:
        return self._runner.run(self._score_latency(n, concurrency))

    async def _score_latency(self, n: int, concurrency: int) -> dict[str, float]:
        prompt = "Transaction: 912.40 EUR, online, country BR, 03:12. Is this fraud? Answer:"
        client = self.client()
        lat: list[float] = []

        async def one() -> None:
            r = await client.score(prompt, [" yes", " no"])
            lat.append(r.latency_ms)

        t0 = time.perf_counter()
        for _ in range(n // concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        return {
            "concurrency": concurrency,
            "p50_ms": _pct(lat, 50),
            "p99_ms": _pct(lat, 99),
            "per_s": len(lat) / wall,
        }


def start(b: Bench, system: str) -> _System:
    if system in SERVER_SYSTEMS:
        return _Server(b, system)
    if system == LLAMA_SERVER:
        return _llama_server(b)
    return _Worker(system, b)


def _llama_server(b: Bench) -> _System:
    from slimserve.bench.llama_server import LlamaServer

    if b.llama_server is None or b.served_gguf is None:
        raise RuntimeError("no llama-server binary or GGUF (the CLI finds or builds them)")
    return LlamaServer(
        b.llama_server,
        b.served_gguf,
        b.chat_template,
        threads=b.threads,
        slots=b.max_batch,
        cells_per_slot=b.stream_tokens,
        kv_layout=b.kv_layout,
        prompt_ids=b.prompt_ids,
    )


def measure(proc: _System, system: str, c: int, rep: int, new_tokens: int) -> Sample:
    """One run of `system` at concurrency `c`, its memory sampled meanwhile."""
    prompts = prompts_for(rep, c)
    load = _loadavg()
    try:
        with PeakMemory(proc.pid) as mem:
            out = proc.run(prompts, new_tokens)
        hwm = tree_hwm_mb(proc.pid)
    except Exception as exc:  # the run's error is the figure; the other systems go on
        return Sample(system, c, rep, load_before=load, error=describe(exc))
    if "error" in out:
        return Sample(system, c, rep, load_before=load, error=str(out["error"]))
    runs = out["runs"]
    outputs = {}
    if c == 1:
        outputs = {
            p: {"token_ids": r["token_ids"], "text": r["text"]}
            for p, r in zip(prompts, runs, strict=True)
        }
    return Sample(
        system=system,
        concurrency=c,
        repeat=rep,
        ttft_ms=[r["ttft_ms"] for r in runs],
        itl_ms=[x for r in runs for x in r["itl_ms"]],
        e2e_ms=[r["e2e_ms"] for r in runs],
        tokens=sum(r["tokens"] for r in runs),
        wall_s=out["wall_s"],
        peak_rss_mb=mem.rss_mb,
        peak_pss_mb=mem.pss_mb,
        hwm_rss_mb=hwm,
        load_before=load,
        outputs=outputs,
    )


# --- summaries -----------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    from slimserve.bench.http_load import percentile

    return percentile(values, q)


def _row(b: Bench, system: str, c: int, ok: list[Sample], failed: int) -> dict[str, Any]:
    ttft = [x for s in ok for x in s.ttft_ms]
    itl = [x for s in ok for x in s.itl_ms]
    e2e = [x for s in ok for x in s.e2e_ms]
    return {
        "system": system,
        "model": b.model,
        "concurrency": c,
        "threads": b.threads,
        "new_tokens": b.new_tokens,
        "repeats": len(ok),
        "failed_runs": failed,
        "ttft_ms_p50": _pct(ttft, 50),
        "ttft_ms_p99": _pct(ttft, 99),
        "itl_ms_mean": statistics.mean(itl) if itl else float("nan"),
        "itl_ms_p50": _pct(itl, 50),
        "itl_ms_p90": _pct(itl, 90),
        "itl_ms_p99": _pct(itl, 99),
        "e2e_ms_p50": _pct(e2e, 50),
        # First to last token: the decode alone, apart from the time to the first.
        "decode_ms_p50": _pct(
            [e - t for s in ok for e, t in zip(s.e2e_ms, s.ttft_ms, strict=True)], 50
        ),
        "tokens_per_s": statistics.median(s.tokens / s.wall_s for s in ok),
        "decode_tokens_per_s": 1e3 / statistics.mean(itl) if itl else float("nan"),
        "peak_rss_mb": max(s.peak_rss_mb for s in ok),
        "peak_pss_mb": max(s.peak_pss_mb for s in ok),
        "hwm_rss_mb": max(s.hwm_rss_mb for s in ok),
        "load_before": statistics.median(s.load_before for s in ok),
    }


def summarise(b: Bench) -> list[dict[str, Any]]:
    """One row per system and concurrency (an `error` row when no run succeeded); the
    faster llama.cpp system per concurrency has `best_llamacpp` true."""
    rows = []
    for system in b.systems:
        for c in b.concurrency:
            ss = [s for s in b.samples if s.system == system and s.concurrency == c]
            ok = [s for s in ss if not s.error]
            if ok:
                rows.append(_row(b, system, c, ok, len(ss) - len(ok)))
            elif ss:
                rows.append({"system": system, "concurrency": c, "error": ss[0].error})
    best = best_llamacpp(rows)
    for r in rows:
        if r["system"] in LLAMACPP_SYSTEMS and "error" not in r:
            r["best_llamacpp"] = best.get(r["concurrency"]) is r
    return rows


def best_llamacpp(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Concurrency -> the llama.cpp row with the most tokens/s there."""
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["system"] not in LLAMACPP_SYSTEMS or "error" in r:
            continue
        held = best.get(r["concurrency"])
        if held is None or r["tokens_per_s"] > held["tokens_per_s"]:
            best[r["concurrency"]] = r
    return best


def markdown(rows: list[dict[str, Any]]) -> str:
    best = best_llamacpp(rows)
    lines = [
        "| system | conc | TTFT p50 ms | TTFT p99 ms | decode p50 ms | ITL mean ms | "
        "ITL p50 ms | ITL p90 ms | ITL p99 ms | tok/s | decode tok/s | "
        f"vs {BEST_LLAMACPP} | peak RSS MB | peak PSS MB | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['concurrency']} | error: {r['error']} |")
            continue
        ref = best.get(r["concurrency"])
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref else "n/a"
        name = r["system"] + (f" ({BEST_LLAMACPP})" if r.get("best_llamacpp") else "")
        lines.append(
            f"| {name} | {r['concurrency']} | {r['ttft_ms_p50']:.1f} | "
            f"{r['ttft_ms_p99']:.1f} | {r.get('decode_ms_p50', float('nan')):.0f} | "
            f"{r.get('itl_ms_mean', float('nan')):.2f} | {r['itl_ms_p50']:.2f} | "
            f"{r.get('itl_ms_p90', float('nan')):.2f} | {r['itl_ms_p99']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {ratio} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} | {r['load_before']:.2f} |"
        )
    lines.append(
        "tok/s: generated tokens over wall time, median of repeats; decode: first to last "
        "token of a request (TTFT apart); ITL: per token (tokens "
        "streamed together: 0). Peak RSS/PSS: summed over the system's processes (server, "
        "engine processes, forkserver), sampled during each run, MB = 10^6 bytes; RSS counts "
        "copy-on-write pages shared with the forkserver once per process, PSS divides them: "
        "the memory target is judged on PSS."
    )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Target:
    """One target as a measured value against its goal."""

    label: str
    value: float
    goal: float
    unit: str = "x"
    #: True: the value must stay at or under the goal (memory); else reach it (speed).
    at_most: bool = False

    @property
    def passed(self) -> bool:
        return self.value <= self.goal if self.at_most else self.value >= self.goal

    def line(self) -> str:
        op = "<=" if self.at_most else ">="
        fmt = ".0f" if self.unit == " MB" else ".3f"
        return (
            f"{self.label}: {self.value:{fmt}}{self.unit} (target {op} {self.goal:g}"
            f"{self.unit}) {'PASS' if self.passed else 'MISS'}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "value": self.value,
            "goal": self.goal,
            "unit": self.unit.strip(),
            "at_most": self.at_most,
            "passed": self.passed,
        }


#: (what is compared, system, baseline or BEST_LLAMACPP, concurrency, goal), on tokens/s.
SPEED_TARGETS = (
    ("engine in-process vs llama.cpp's own loop on the same Q8_0 weights", "engine",
     "llama_cpp_q8", 1, 0.97),
    ("engine in-process vs llama.cpp batched decode on the same Q8_0 weights", "engine",
     "llama_cpp_q8", 16, 1.0),
    ("slimserve over gRPC with a draft vs best llama.cpp plain decode", "slimserve_draft",
     BEST_LLAMACPP, 1, 1.3),
    # On a GPU (`--device cuda`), against what a user of transformers would write.
    ("slimserve over gRPC vs Hugging Face generate() on the same device", "slimserve",
     "hf_generate", 1, 1.0),
    ("slimserve over gRPC vs Hugging Face generate() batched on the same device", "slimserve",
     "hf_generate", 16, 3.0),
)  # fmt: skip


def targets(rows: list[dict[str, Any]]) -> list[Target]:
    """The targets whose systems ran: speed ratios on tokens/s, then peak PSS."""
    by = {(r["system"], r["concurrency"]): r for r in rows if "error" not in r}
    best = best_llamacpp(rows)
    out = []
    for label, system, baseline, c, goal in SPEED_TARGETS:
        mine = by.get((system, c))
        ref = best.get(c) if baseline == BEST_LLAMACPP else by.get((baseline, c))
        if mine is None or ref is None:
            continue
        out.append(
            Target(
                label=f"{label}, c={c} ({system} {mine['tokens_per_s']:.1f} vs "
                f"{ref['system']} {ref['tokens_per_s']:.1f} tok/s)",
                value=mine["tokens_per_s"] / ref["tokens_per_s"],
                goal=goal,
            )
        )
    for system in SERVER_SYSTEMS:
        pss = [r["peak_pss_mb"] for r in rows if r["system"] == system and "error" not in r]
        if pss:
            out.append(
                Target(
                    label=f"peak PSS of {system}'s serving processes",
                    value=max(pss),
                    goal=PSS_TARGET_MB,
                    unit=" MB",
                    at_most=True,
                )
            )
    return out


def outputs(samples: list[Sample]) -> dict[str, dict[str, dict[str, Any]]]:
    """System -> prompt -> its first recorded greedy output at concurrency 1."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for s in samples:
        for prompt, o in s.outputs.items():
            out.setdefault(s.system, {}).setdefault(prompt, o)
    return out


def same_outputs(samples: list[Sample], a: str, b: str) -> dict[str, Any] | None:
    """Whether `a` generated token for token what `b` did, on the prompts both ran at
    concurrency 1; None when either has no output."""
    seen = outputs(samples)
    mine, theirs = seen.get(a, {}), seen.get(b, {})
    prompts = [p for p in mine if p in theirs]
    if not prompts:
        return None
    same = sum(mine[p]["token_ids"] == theirs[p]["token_ids"] for p in prompts)
    return {"system": a, "reference": b, "identical": same, "prompts": len(prompts)}


def identical_line(cmp: dict[str, Any]) -> str:
    yes = "yes" if cmp["identical"] == cmp["prompts"] else "no"
    return (
        f"outputs identical: {yes} ({cmp['identical']} of {cmp['prompts']} prompts; "
        f"{cmp['system']} vs {cmp['reference']}, greedy, token for token, c=1)"
    )


def ipc_overhead(rows: list[dict[str, Any]]) -> list[str]:
    """The engine in its own process against in-process, per concurrency (same plan)."""
    by = {(r["system"], r["concurrency"]): r for r in rows if "error" not in r}
    lines = []
    for (system, c), ipc in sorted(by.items()):
        local = by.get(("engine", c))
        if system != "engine_ipc" or local is None:
            continue
        cost = ipc["itl_ms_p50"] / local["itl_ms_p50"] - 1
        lines.append(
            f"engine over IPC vs in-process, concurrency {c}: tok/s "
            f"{ipc['tokens_per_s'] / local['tokens_per_s']:.3f}x, ITL p50 "
            f"{ipc['itl_ms_p50']:.2f} vs {local['itl_ms_p50']:.2f} ms "
            f"({cost:+.1%} per token; target <= +5%)"
        )
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    systems = sorted({r["system"] for r in ok})
    concs = sorted({r["concurrency"] for r in ok})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(systems), 1)
    for i, s in enumerate(systems):
        vals = [
            next((r["tokens_per_s"] for r in ok if r["system"] == s and r["concurrency"] == c), 0)
            for c in concs
        ]
        ax.bar([j + i * width for j in range(len(concs))], vals, width, label=s)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(concs))])
    ax.set_xticklabels([f"concurrency {c}" for c in concs])
    ax.set_ylabel("generated tokens/s (aggregate)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_flags(cpu: CpuInfo) -> str:
    """The flags that decide which kernels exist, present and absent ("amx_*": none)."""
    amx = sorted(f for f in cpu.flags if f.startswith("amx_"))
    have = [f for f in SHOWN_FLAGS if f in cpu.flags] + amx
    absent = [f for f in SHOWN_FLAGS if f not in cpu.flags] + ([] if amx else ["amx_*"])
    text = " ".join(have) or "none of " + " ".join(SHOWN_FLAGS)
    return text + (f" (absent: {' '.join(absent)})" if absent else "")


def environment(b: Bench) -> dict[str, Any]:
    import torch

    from slimserve.engine.machine import cpu_info, llamacpp_build

    cpu = cpu_info()
    build = llamacpp_build() or {}
    return {
        "command": shlex.join(sys.argv),
        "cpu": cpu.model,
        "cpu_flags": cpu_flags(cpu),
        "cpu_isa": " ".join(cpu.isa),
        "amx": cpu.has_amx,
        "llamacpp_build": f"{build.get('compiler', 'unrecorded')} native={build.get('native')}",
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": b.threads,
        "model": b.model,
        "hf_generate_model": b.hf_model or b.model,
        "draft": f"{b.draft}, {b.draft_tokens} tokens",
        "new_tokens": b.new_tokens,
        "stream_tokens": b.stream_tokens,
        "kv_layout": b.kv_layout,
        "decode_threads": b.decode_threads or "qualified",
        "device": b.device,
        "gpu": gpu_name(b.device),
        "repeats": b.repeats,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def gpu_name(device: str) -> str:
    """The accelerator's name for a CUDA `device` ("" on the CPU)."""
    if not device.startswith("cuda"):
        return ""
    import torch

    if not torch.cuda.is_available():
        return "CUDA not available"
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"


def _start_all(b: Bench) -> tuple[dict[str, _System], dict[str, str]]:
    procs: dict[str, _System] = {}
    failed: dict[str, str] = {}
    for system in raced(b):
        try:
            procs[system] = start(b, system)
        except Exception as exc:  # recorded as its figure; the others still run
            failed[system] = f"did not start: {describe(exc)}"
            print(f"  {system}: {failed[system]}", file=sys.stderr, flush=True)
    return procs, failed


def raced(b: Bench) -> list[str]:
    """The systems of `b` raced at each concurrency (all but the mixed scenario)."""
    return [s for s in b.systems if s in RACED]


def _race(b: Bench, procs: dict[str, _System], failed: dict[str, str]) -> None:
    for rep in range(b.repeats):
        for c in b.concurrency:
            for system in raced(b):
                if system in failed:
                    b.samples.append(Sample(system, c, rep, error=failed[system]))
                    continue
                s = measure(procs[system], system, c, rep, b.new_tokens)
                b.samples.append(s)
                if s.error and not procs[system].alive():
                    failed[system] = s.error
                rate = f"{s.tokens / s.wall_s:.1f} tok/s" if not s.error else s.error
                print(f"  rep {rep} c={c:<2} {system:15} {rate}", file=sys.stderr, flush=True)


def run(b: Bench, *, score: bool = True) -> dict[str, Any]:
    """Start every system, race them, stop them; the report `slimserve bench serve` prints
    and writes as JSON."""
    procs, failed = _start_all(b)
    scores = []
    chat: dict[str, dict[str, Any]] = {}
    try:
        _race(b, procs, failed)
        server = procs.get("slimserve")
        if isinstance(server, _Server) and score and "slimserve" not in failed:
            scores = [server.score_latency(32, c) for c in (1, 16)]
        chat = _chat_probes(b, procs, failed)
    finally:
        for proc in procs.values():
            proc.close()
    mixed = _mixed(b) if MIXED in b.systems else None
    prefix = _prefix(b) if PREFIX in b.systems else None
    env = environment(b)
    env["served"] = {system: proc.served for system, proc in procs.items()}
    rows = summarise(b)
    return {
        "environment": env,
        "results": rows,
        "score": scores,
        "chat_probe": chat,
        "mixed": mixed,
        "prefix": prefix,
        "targets": [t.to_dict() for t in (*targets(rows), *chat_targets(chat))],
        "outputs": outputs(b.samples),
        "outputs_identical": same_outputs(b.samples, "slimserve_draft", "slimserve"),
    }


def _chat_probes(
    b: Bench, procs: dict[str, _System], failed: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """System -> the one-token chat probe's latencies, for each server that ran, then
    CHAT_PEER's (`b.chat_peer`: in a worker of its own, started for the probe alone)."""
    out: dict[str, dict[str, Any]] = {}
    if not b.chat_probe:
        return out
    for system in CHAT_PROBED:
        proc = procs.get(system)
        if proc is None or system in failed:
            continue
        try:
            out[system] = proc.chat_probe(b.chat_probe)  # type: ignore[attr-defined]
        except Exception as exc:  # the probe's error is its figure
            out[system] = {"error": describe(exc)}
    if b.chat_peer:
        out[CHAT_PEER] = chat_peer_probe(b)
    return out


def chat_peer_probe(b: Bench) -> dict[str, Any]:
    """CHAT_PEER's chat probe: a worker loads `b.served_gguf` on `b.threads` threads, times
    `b.chat_probe` requests in its own process and ends; the figures with what served
    them, or the error that stopped it."""
    try:
        worker = _Worker(PEER_WORKER, b)
    except Exception as exc:
        return {"error": f"did not start: {describe(exc)}"}
    try:
        return {**worker.chat_probe(b.chat_probe), "served": worker.served}
    except Exception as exc:  # the probe's error is its figure
        return {"error": describe(exc)}
    finally:
        worker.close()


def _mixed(b: Bench) -> dict[str, Any]:
    """The mixed scenario on a server of its own (contexts long enough for its prompts),
    then, as its baseline, on one that feeds prompts whole between steps."""
    from slimserve.bench import mixed

    def runs(server: _Server) -> dict[str, Any]:
        return {"runs": [server.call(mixed.run(server, b)) for _ in range(b.repeats)]}

    # Slots for what runs at once (the streams, the long prompts, a spare), not --max-batch:
    # 16 slots of a 2,048-token context would not fit the default KV budget.
    slots = b.mixed_streams + mixed.LONG_PROMPTS + 1
    context = mixed.max_seq_len(b.mixed_long_tokens)
    out = _scenario(b, MIXED, context, runs, max_batch=slots)
    if b.mixed_baseline:
        out["whole"] = _scenario(
            b, MIXED, context, runs, max_batch=slots, extra=mixed.WHOLE_PROMPTS_ARGS
        )
    return out


def _prefix(b: Bench) -> dict[str, Any]:
    """The prefix-cache scenario on a server of its own (contexts long enough for it)."""
    from slimserve.bench import prefix

    def runs(server: _Server) -> dict[str, Any]:
        return {"run": server.call(prefix.run(server, b))}

    return _scenario(b, PREFIX, prefix.max_seq_len(b.prefix_tokens), runs)


def _scenario(
    b: Bench,
    system: str,
    max_seq_len: int,
    runs: Callable[[_Server], dict[str, Any]],
    *,
    max_batch: int = 0,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """`runs` against a server of its own (`extra`: more `serve` flags); what it found, or
    the error that stopped it."""
    try:
        server = _Server(b, system, max_seq_len=max_seq_len, max_batch=max_batch, extra=extra)
    except Exception as exc:
        return {"error": f"did not start: {describe(exc)}"}
    try:
        return {"served": server.served, **runs(server)}
    except Exception as exc:
        return {"error": describe(exc), "served": server.served}
    finally:
        server.close()


def chat_lines(chat: dict[str, dict[str, Any]]) -> list[str]:
    """Each chat-probed system's latencies (CHAT_PEER's with what served it)."""
    lines = []
    for system, r in chat.items():
        if "error" in r:
            lines.append(f"one-token chat, {system}: error: {r['error']}")
            continue
        what = f" ({r['served']})" if r.get("served") else ""
        prompt = f", {r['prompt_tokens']} prompt tokens" if r.get("prompt_tokens") else ""
        lines.append(
            f"one-token chat on a new user message, {system}{what}: p50 {r['p50_ms']:.1f} ms, "
            f"p90 {r['p90_ms']:.1f} ms ({r['n']:.0f} requests one after another{prompt})"
        )
    return lines


def chat_targets(chat: dict[str, dict[str, Any]]) -> list[Target]:
    """slimserve's one-token chat p50 over gRPC and over HTTP against CHAT_PEER's, where
    both were measured."""
    peer = chat.get(CHAT_PEER, {})
    if "p50_ms" not in peer:
        return []
    out = []
    for system, door in CHAT_TARGET_SYSTEMS:
        mine = chat.get(system, {})
        if "p50_ms" not in mine:
            continue
        out.append(
            Target(
                label=f"one-token chat on a new user message, p50 of {mine['n']:.0f}, "
                f"slimserve over {door} vs llama-cpp-python in-process on the same weights "
                f"({system} {mine['p50_ms']:.1f} vs {CHAT_PEER} {peer['p50_ms']:.1f} ms)",
                value=mine["p50_ms"] / peer["p50_ms"],
                goal=CHAT_TARGET,
                at_most=True,
            )
        )
    return out


def served_lines(env: dict[str, Any]) -> list[str]:
    """Which plan each slimserve system served (they must match) and llama-server's file."""
    served = env.get("served", {})
    return [f"served by {system}: {what}" for system, what in served.items()]


def report_lines(report: dict[str, Any]) -> list[str]:
    """What `slimserve bench serve` prints after the environment: the CPU, the table, the
    IPC cost, each target as PASS/MISS, and whether the draft changed the output."""
    env = report["environment"]
    lines = [f"CPU: {env['cpu']}; {env['cpu_flags']}"]
    if env.get("gpu"):
        lines.append(f"GPU: {env['gpu']} (slimserve, engine and hf_generate on {env['device']})")
    if "stream_tokens" in env:
        lines.append(
            f"Every system holds {env['stream_tokens']} tokens of KV cache per stream "
            "(llama.cpp: a context split per sequence; slimserve: --max-seq-len, KV layout "
            f"{env.get('kv_layout', 'auto')})."
        )
    if report["results"]:
        lines += ["", markdown(report["results"]), ""]
    lines += ipc_overhead(report["results"])
    lines += side_by_side(report["results"])
    lines += [t.line() for t in targets(report["results"])]
    if report.get("outputs_identical"):
        lines.append(identical_line(report["outputs_identical"]))
    lines += chat_lines(report.get("chat_probe") or {})
    lines += [t.line() for t in chat_targets(report.get("chat_probe") or {})]
    if report.get("mixed"):
        from slimserve.bench.mixed import report_lines as mixed_lines

        lines += mixed_lines(report["mixed"])
    if report.get("prefix"):
        from slimserve.bench.prefix import report_lines as prefix_lines

        lines += prefix_lines(report["prefix"])
    return lines


#: (system, baseline): ratios `side_by_side` prints when both ran.
PAIRS = (
    ("slimserve", "engine"),
    ("slimserve_http", "engine"),
    ("slimserve_nopool", "engine_nopool"),
    ("slimserve", "slimserve_nopool"),
    ("engine", "engine_nopool"),
    ("slimserve_http", LLAMA_SERVER),
)


def side_by_side(rows: list[dict[str, Any]]) -> list[str]:
    """Served against in-process, with against without the threadpool, slimserve against
    llama-server: tokens/s, TTFT and ITL ratios per concurrency."""
    by = {(r["system"], r["concurrency"]): r for r in rows if "error" not in r}
    lines = []
    for system, base in PAIRS:
        for c in sorted({c for s, c in by if s == system}):
            a, z = by.get((system, c)), by.get((base, c))
            if a is None or z is None:
                continue
            lines.append(
                f"{system} vs {base}, c={c}: tok/s {a['tokens_per_s'] / z['tokens_per_s']:.3f}x "
                f"({a['tokens_per_s']:.1f} vs {z['tokens_per_s']:.1f}), TTFT p50 "
                f"{a['ttft_ms_p50']:.1f} vs {z['ttft_ms_p50']:.1f} ms, ITL p50/p90/p99 "
                f"{a['itl_ms_p50']:.2f}/{a['itl_ms_p90']:.2f}/{a['itl_ms_p99']:.2f} vs "
                f"{z['itl_ms_p50']:.2f}/{z['itl_ms_p90']:.2f}/{z['itl_ms_p99']:.2f} ms"
            )
    return lines
