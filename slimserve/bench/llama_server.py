"""llama.cpp's own `llama-server` as a `bench serve` system (`llama_server`).

The binary is `llama-server` on PATH, else one built for this CPU from the llama.cpp
sources that the installed llama-cpp-python vendors (its sdist, from PyPI through pip), with
the compiler and native flags scripts/build-llamacpp uses for the wheel, cached per CPU,
compiler, flags and version the same way (`find_binary`, `build`). It serves the weights
slimserve's llama.cpp backend serves: the served version exported by the same
`gguf_export` to the GGUF type of the plan this machine qualified (`export_served_gguf`),
with the artifact's chat template. Its KV cache is laid out as slimserve's (`-np` slots of
the same cells each, split or unified), on the same threads, driven by the same openai
client (`http_load.OpenAIDriver`).

    python -m slimserve.bench.llama_server build     # build (or find) it; prints the path
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from slimserve.bench.http_load import OpenAIDriver

log = logging.getLogger(__name__)

#: Compilers tried in order (scripts/build-llamacpp's list: GCC 12 miscompiles ggml's AMX).
COMPILERS = (
    ("clang-19", "clang++-19"), ("clang-18", "clang++-18"), ("clang-17", "clang++-17"),
    ("clang", "clang++"), ("gcc-14", "g++-14"), ("gcc-13", "g++-13"),
)  # fmt: skip
#: CMake flags beside the compilers: native code, one static binary, no web UI, no TLS.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON "
    "-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF"
)
#: slimserve's llama.cpp backend's batch and ubatch (`llamacpp._BATCH_TOKENS`, `_UBATCH_TOKENS`).
BATCH, UBATCH = 4096, 512


def llama_cpp_python_version() -> str | None:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _compiler() -> tuple[str, str, str] | None:
    """(cc, cxx, `cc --version`'s first line) of the first compiler pair installed."""
    for cc, cxx in COMPILERS:
        if shutil.which(cc) and shutil.which(cxx):
            ver = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True)
            first = ver.stdout
            return cc, cxx, first.splitlines()[0] if first else cc
    return None


def find_binary(cache: Path, version: str | None = None) -> Path | None:
    """`llama-server` on PATH, else one this CPU built into `cache` for `version` (the
    installed llama-cpp-python's by default); None when there is neither."""
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    from slimserve.engine.machine import cpu_info

    version = version or llama_cpp_python_version()
    digest = cpu_info().flags_digest
    for record in sorted(cache.glob("*/build.json")):
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(record.read_text())
            binary = record.parent / "llama-server"
            mine = info.get("cpu_flags") == digest and info.get("version") == version
            if mine and binary.is_file():
                return binary
    return None


def build(cache: Path, version: str | None = None, jobs: int = 0) -> Path:
    """Build `llama-server` for this CPU into `cache` (once: a cached build is returned).

    Raises:
        RuntimeError: no llama-cpp-python version to build, no compiler, no cmake, or a
            step failed (its last lines in the message).
    """
    version = version or llama_cpp_python_version()
    if version is None:
        raise RuntimeError("llama-cpp-python is not installed: no llama.cpp version to build")
    found = find_binary(cache, version)
    if found is not None:
        return found
    compiler = _compiler()
    if compiler is None or not shutil.which("cmake"):
        raise RuntimeError("needs cmake and clang (or GCC >= 13) to build llama-server")
    cc, cxx, cc_version = compiler
    args = f"-DCMAKE_C_COMPILER={cc} -DCMAKE_CXX_COMPILER={cxx} {CMAKE_FLAGS}"
    from slimserve.engine.machine import build_key, cpu_info

    out = cache / build_key(cc_version, args, version)
    sdist = _sdist(cache / "src", version)
    started = time.monotonic()
    print(
        f"llama_server: building llama-server from llama-cpp-python {version}'s llama.cpp "
        f"with {cc} for this CPU (once; several minutes)",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="slimserve-llama-server-") as tmp:
        src = _extract(sdist, Path(tmp))
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        _step(["cmake", "-S", str(src), "-B", f"{tmp}/build", *gen, *args.split()])
        parallel = ["-j", str(jobs)] if jobs else ["-j"]
        _step(["cmake", "--build", f"{tmp}/build", "--target", "llama-server", *parallel])
        out.mkdir(parents=True, exist_ok=True)
        partial = out / "llama-server.partial"
        shutil.copy2(Path(tmp) / "build" / "bin" / "llama-server", partial)
        partial.replace(out / "llama-server")
    record = {
        "version": version,
        "compiler": cc_version,
        "cmake_args": args,
        "cpu_flags": cpu_info().flags_digest,
        "seconds": round(time.monotonic() - started),
    }
    (out / "build.json").write_text(json.dumps(record, indent=1))
    return out / "llama-server"


def _sdist(directory: Path, version: str) -> Path:
    """llama-cpp-python's source distribution (it vendors llama.cpp), downloaded once."""
    path = directory / f"llama_cpp_python-{version}.tar.gz"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        _step([
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={version}",
            "-d", str(directory),
        ])  # fmt: skip
    if not path.is_file():
        raise RuntimeError(f"pip download left no {path.name} in {directory}")
    return path


def _extract(sdist: Path, into: Path) -> Path:
    """Its vendor/llama.cpp tree, unpacked under `into`."""
    top = sdist.name.removesuffix(".tar.gz")
    prefix = f"{top}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(into, members=members, filter="data")
    return into / prefix


def _step(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed ({proc.returncode}):\n{tail}")


def export_served_gguf(
    registry: Path, ref: str, config: Any, out_dir: Path
) -> tuple[Path, Path | None, str]:
    """The GGUF slimserve's llama.cpp backend serves `ref` from (the plan this machine
    qualified, read from the registry's verdict cache like `serve`), written once into
    `out_dir`, its chat template beside it (None: the model has none), and the plan's key.

    Raises:
        RuntimeError: `ref` is not served by a llama.cpp plan here.
    """
    from slimserve.bench.served import served_plan
    from slimserve.engine.backends.gguf_export import export_gguf
    from slimserve.engine.backends.select import open_model

    artifact, plan = served_plan(registry, ref, config)
    if plan is None or plan.backend != "llamacpp":
        key = plan.key if plan is not None else "no qualified plan"
        raise RuntimeError(f"{artifact.ref} is served by {key}, not llama.cpp: no GGUF to race")
    stem = f"{artifact.name}-{artifact.version}-{artifact.digest[:12]}-{plan.weights}"
    gguf = out_dir / f"{stem}.gguf"
    template = out_dir / f"{stem}.jinja"
    import torch

    if not gguf.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        weights, tokenizer = open_model(
            artifact, config, plan, device=torch.device("cpu"), dtype=torch.float32
        )
        partial = gguf.with_suffix(".partial")
        export_gguf(weights.config, weights, artifact.path / "tokenizer.json", partial,
                    plan.weights)  # type: ignore[arg-type]  # fmt: skip
        partial.replace(gguf)
        chat = getattr(tokenizer, "chat_template", None)
        if chat:
            template.write_text(chat)
    return gguf, template if template.is_file() else None, plan.key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """A running `llama-server` on loopback, driven through the openai SDK."""

    def __init__(
        self,
        binary: Path,
        gguf: Path,
        template: Path | None,
        *,
        threads: int,
        slots: int,
        cells_per_slot: int,
        kv_layout: str,
        prompt_ids: Mapping[str, list[int]],
        start_timeout_s: float = 600.0,
    ) -> None:
        self.port = _free_port()
        cmd = [
            str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
            "-t", str(threads), "-tb", str(threads), "-np", str(slots),
            "-c", str(slots * cells_per_slot), "-b", str(BATCH), "-ub", str(UBATCH),
            "--kv-unified" if kv_layout == "unified" else "--no-kv-unified", "--no-webui",
        ]  # fmt: skip
        if template is not None:
            cmd += ["--jinja", "--chat-template-file", str(template)]
        self.log: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, text=True)
        self.served = f"llama-server ({binary}) on {gguf.name}"
        self.driver = OpenAIDriver(f"http://127.0.0.1:{self.port}/v1", gguf.stem, prompt_ids)
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.proc.returncode}: {self._tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server was not ready within {timeout_s} s: {self._tail()}")

    def _tail(self) -> str:
        self.log.seek(0)
        lines = [ln.strip() for ln in self.log.read().splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, prompts: list[str], new_tokens: int) -> dict[str, Any]:
        return self.driver.run(prompts, new_tokens)

    def chat_probe(self, n: int) -> dict[str, float]:
        return self.driver.chat_probe(n)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.driver.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimserve.bench.llama_server")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) llama-server for this CPU; print its path")
    b.add_argument("--cache", type=Path, required=True, help="the build cache directory")
    b.add_argument("--jobs", type=int, default=0, help="parallel compile jobs (0: all cores)")
    args = p.parse_args(argv)
    try:
        print(build(args.cache, jobs=args.jobs))
    except RuntimeError as exc:
        print(f"llama-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
