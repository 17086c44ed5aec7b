"""Peak memory of a serving process tree, per process, and what its imports cost.

`python -m slimserve.bench.memory --model NAME@REF` starts `slimserve serve` on a free port,
samples every process of the tree (the server, the forkserver, each engine process and
any qualification process) while the server loads and while a few streams run, then
prints per process and summed peaks of RSS and PSS (`/proc/<pid>/smaps_rollup`). PSS is
the figure that adds up: pages a forkserver shares with the engines it forked count once
in the sum, where summed RSS counts them in every process.

`--imports` adds what each heavy import adds to a fresh interpreter's RSS, in order.

Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Imported one after the other in a fresh interpreter by `import_costs`.
IMPORTS = (
    "numpy",
    "grpc",
    "tokenizers",
    "jinja2",
    "safetensors",
    "torch",
    "transformers",
    "llama_cpp",
    "gguf",
    "slimserve.engine.loader",
    "slimserve.server.app",
)

_PROMPTS = (
    "Write a haiku about memory.",
    "Explain what a KV cache is in two sentences.",
    "List three prime numbers and say why they are prime.",
    "What is the capital of France?",
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One process's memory at one moment, in bytes."""

    rss: int
    pss: int


def read_memory(pid: int) -> Sample | None:
    """RSS and PSS of `pid` from smaps_rollup; None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0]) * 1024
    if "Rss" not in fields:
        return None
    return Sample(rss=fields["Rss"], pss=fields.get("Pss", fields["Rss"]))


def children(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's list: a child belongs to the thread that
    forked it)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def tree(root: int) -> Iterator[tuple[int, int]]:
    """(pid, depth) of `root` and everything below it."""
    stack = [(root, 0)]
    while stack:
        pid, depth = stack.pop()
        yield pid, depth
        stack += [(c, depth + 1) for c in children(pid)]


def role(pid: int, depth: int) -> str:
    """What a process of a serving tree is, from its command line and depth."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return "gone"
    if depth == 0:
        return "server"
    if "forkserver" in cmd and depth == 1:
        return "forkserver"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    return "engine" if depth >= 2 else "child"


@dataclass(slots=True)
class Peaks:
    """Peaks seen by `Sampler`: per process (role, pid) and of the tree's sums."""

    per_process: dict[tuple[str, int], Sample] = field(default_factory=dict)
    sum_rss: int = 0
    sum_pss: int = 0

    def add(self, samples: dict[tuple[str, int], Sample]) -> None:
        for key, s in samples.items():
            old = self.per_process.get(key, Sample(0, 0))
            self.per_process[key] = Sample(max(old.rss, s.rss), max(old.pss, s.pss))
        self.sum_rss = max(self.sum_rss, sum(s.rss for s in samples.values()))
        self.sum_pss = max(self.sum_pss, sum(s.pss for s in samples.values()))


class Sampler:
    """Samples a process tree every `interval_s` on a thread, into phases of `Peaks`."""

    def __init__(self, root: int, interval_s: float = 0.2) -> None:
        self.root = root
        self.interval_s = interval_s
        self.phases: dict[str, Peaks] = {}
        self.phase = "load"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> dict[tuple[str, int], Sample]:
        out = {}
        for pid, depth in tree(self.root):
            mem = read_memory(pid)
            if mem is not None:
                out[(role(pid, depth), pid)] = mem
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.phases.setdefault(self.phase, Peaks()).add(self.sample())
            self._stop.wait(self.interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_streams(target: str, streams: int, new_tokens: int, chat: bool) -> int:
    """`streams` concurrent greedy streams (half of them chat when `chat`); tokens received."""
    from slimserve.clients import Client
    from slimserve.clients.types import ChatMessage

    counts = [0] * streams

    def one(i: int) -> None:
        text = _PROMPTS[i % len(_PROMPTS)]
        prompt = [ChatMessage(role="user", content=text)] if chat and i % 2 else text
        with Client(target, timeout=600, retries=0) as c:
            for chunk in c.stream(prompt, max_new_tokens=new_tokens, ignore_eos=True):
                counts[i] += len(chunk.token_ids) or 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def measure_serve(
    model: str,
    registry: Path | None,
    *,
    streams: int = 4,
    new_tokens: int = 64,
    rounds: int = 2,
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = 1800.0,
) -> dict[str, object]:
    """Start a server, wait for health, run `rounds` x `streams` streams; the peaks."""
    port = free_port()
    cmd = [sys.executable, "-m", "slimserve.cli", "serve", "--model", model,
           "--port", str(port), *extra_args]  # fmt: skip
    if registry is not None:
        cmd += ["--registry", str(registry)]
    target = f"127.0.0.1:{port}"
    # The server's log goes to a file: a pipe nobody reads fills up and stalls the server.
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            return _sample_serving(
                proc,
                target,
                model,
                streams=streams,
                new_tokens=new_tokens,
                rounds=rounds,
                ready_timeout_s=ready_timeout_s,
            )
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode not in (0, -15):
                log.seek(0)
                sys.stderr.write(log.read()[-4000:])


def _sample_serving(
    proc: subprocess.Popen[str],
    target: str,
    model: str,
    *,
    streams: int,
    new_tokens: int,
    rounds: int,
    ready_timeout_s: float,
) -> dict[str, object]:
    from slimserve.clients import Client

    with Sampler(proc.pid) as sampler:
        t0 = time.perf_counter()
        with Client(target, retries=0) as c:
            _wait_serving(c, proc, ready_timeout_s)
            info = c.model_info()
        load_s = time.perf_counter() - t0
        sampler.phase = "idle"
        time.sleep(1.0)
        sampler.phase = "streams"
        tokens = sum(run_streams(target, streams, new_tokens, True) for _ in range(rounds))
        time.sleep(0.5)
    return {
        "model": model,
        "served": f"{info.name}@{info.version} on {info.backend}",
        "load_s": load_s,
        "tokens": tokens,
        "phases": sampler.phases,
    }


def _wait_serving(client: Any, proc: subprocess.Popen[str], timeout_s: float) -> None:
    """Until SERVING; a server that exits first ends the wait at once.

    Raises:
        RuntimeError: the server exited. TimeoutError: not SERVING within `timeout_s`.
    """
    from slimserve.clients.errors import Unavailable

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before SERVING")
        try:
            client.wait_ready(5.0)
            return
        except Unavailable:
            continue
    raise TimeoutError(f"the server was not SERVING after {timeout_s:.0f} s")


_IMPORT_PROBE = """
import importlib, json, sys
from pathlib import Path
def rss():
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
out = [['(interpreter)', rss(), 0]]
for name in sys.argv[1:]:
    before = rss()
    try:
        importlib.import_module(name)
    except Exception as exc:
        out.append([name + ' (' + type(exc).__name__ + ')', rss(), 0]); continue
    out.append([name, rss(), rss() - before])
heavy = [m for m in ('torch', 'transformers', 'llama_cpp', 'torchao') if m in sys.modules]
print(json.dumps({'steps': out, 'heavy_loaded': heavy}))
"""


def import_costs(modules: Sequence[str] = IMPORTS) -> dict[str, object]:
    """RSS after each import of `modules`, in order, in a fresh interpreter (bytes)."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, *modules],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def heavy_imports_of(module: str) -> list[str]:
    """Which of torch, transformers, llama_cpp, torchao importing `module` alone loads."""
    loaded: list[str] = import_costs([module])["heavy_loaded"]  # type: ignore[assignment]
    return loaded


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f}"


def report(result: dict[str, object]) -> str:
    """The peaks as markdown tables (MB = 10^6 bytes)."""
    lines = [f"served: {result['served']}; ready in {result['load_s']:.1f} s; "
             f"{result['tokens']} tokens streamed", ""]  # fmt: skip
    phases: dict[str, Peaks] = result["phases"]  # type: ignore[assignment]
    lines += ["| phase | process | pid | peak RSS MB | peak PSS MB |", "|---|---|---|---|---|"]
    for name, peaks in phases.items():
        for (who, pid), s in sorted(peaks.per_process.items()):
            lines.append(f"| {name} | {who} | {pid} | {_mb(s.rss)} | {_mb(s.pss)} |")
        lines.append(
            f"| {name} | **sum** | | **{_mb(peaks.sum_rss)}** | **{_mb(peaks.sum_pss)}** |"
        )
    overall_rss = max(p.sum_rss for p in phases.values())
    overall_pss = max(p.sum_pss for p in phases.values())
    lines += ["", f"peak summed RSS {_mb(overall_rss)} MB, peak summed PSS {_mb(overall_pss)} MB"]
    return "\n".join(lines)


def import_report(costs: dict[str, object]) -> str:
    lines = ["| import (in order) | RSS after MB | added MB |", "|---|---|---|"]
    for name, rss, added in costs["steps"]:  # type: ignore[attr-defined]
        lines.append(f"| {name} | {_mb(rss)} | {_mb(added)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimserve.bench.memory", description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct@production")
    p.add_argument("--registry", type=Path, help="default: $SLIMSERVE_HOME/registry")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--imports", action="store_true", help="also measure import costs")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for SERVING (a first serve on a machine qualifies plans first)",
    )
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    p.add_argument("serve_args", nargs="*", help="more `serve` flags (after --)")
    args = p.parse_args(argv)
    result = measure_serve(
        args.model,
        args.registry,
        streams=args.streams,
        new_tokens=args.tokens,
        rounds=args.rounds,
        extra_args=args.serve_args,
        ready_timeout_s=args.ready_timeout,
    )
    print(report(result))
    costs = None
    if args.imports:
        costs = import_costs()
        print()
        print(import_report(costs))
        for module in ("slimserve.server.app", "slimserve.engine.launch"):
            print(f"{module} alone loads: {', '.join(heavy_imports_of(module)) or 'none of them'}")
    if args.json:
        phases: dict[str, Peaks] = result["phases"]  # type: ignore[assignment]
        args.json.write_text(
            json.dumps(
                {
                    **{k: v for k, v in result.items() if k != "phases"},
                    "phases": {
                        name: {
                            "sum_rss": p.sum_rss,
                            "sum_pss": p.sum_pss,
                            "processes": [
                                {"role": who, "pid": pid, "rss": s.rss, "pss": s.pss}
                                for (who, pid), s in p.per_process.items()
                            ],
                        }
                        for name, p in phases.items()
                    },
                    "imports": costs,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
