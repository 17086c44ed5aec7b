"""Facts about the machine the engine runs on: the CPU, its instruction sets, the native build.

A qualification verdict or a speed measurement holds for one CPU, one set of library
versions and one native build; `fingerprint()` names all three, so a cache keyed by it is
never read on another machine. `scripts/setup` records here which CPU it compiled llama.cpp
for (`write_build_record`), and `llamacpp_build_problem()` refuses to load a build made for
other instruction sets, which would otherwise die with SIGILL. Imports the standard library
only (it runs before torch is installed).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

#: Instruction sets that change which kernels run (and so what is worth qualifying).
ISA_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512vbmi",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
BUILD_RECORD = Path("share") / "slimserve" / "llamacpp-build.json"


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def isa(self) -> tuple[str, ...]:
        """The instruction sets of `ISA_FLAGS` this CPU has, in that order."""
        return tuple(f for f in ISA_FLAGS if f in self.flags)

    @property
    def has_amx(self) -> bool:
        return "amx_int8" in self.flags or "amx_bf16" in self.flags

    @property
    def has_native_bf16(self) -> bool:
        """bfloat16 matrix units (AVX512-BF16 or AMX-BF16): oneDNN runs bf16 natively."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def flags_digest(self) -> str:
        """sha256 of the sorted flags: what a native build depends on."""
        return hashlib.sha256(" ".join(sorted(self.flags)).encode()).hexdigest()[:16]


@functools.cache
def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """The first CPU's model name and flags (Linux), else what `platform` knows."""
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        text = cpuinfo.read_text()
    except OSError:
        return CpuInfo(model, flags)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.processor(), platform.machine()):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if not line.strip() and flags:
            break  # the first processor's block is enough
    return CpuInfo(model, flags)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def llamacpp_build(prefix: Path | None = None) -> dict[str, Any] | None:
    """What `scripts/setup` recorded about the llama.cpp build in this environment."""
    path = (prefix or Path(sys.prefix)) / BUILD_RECORD
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record


def llamacpp_build_problem(cpu: CpuInfo | None = None, prefix: Path | None = None) -> str | None:
    """Why the installed llama.cpp build must not run on this CPU, or None.

    A build without a record (installed by hand) is not refused here: qualification in a
    throwaway process still catches one that crashes.
    """
    record = llamacpp_build(prefix)
    if record is None:
        return None
    cpu = cpu or cpu_info()
    if record.get("native") and record.get("cpu_flags_digest") != cpu.flags_digest:
        return (
            f"llama.cpp was compiled for another CPU ({record.get('cpu_model')}, flags "
            f"{record.get('cpu_flags_digest')}; this one is {cpu.model}, {cpu.flags_digest}): "
            "rerun scripts/setup to build it for this machine"
        )
    return None


def fingerprint() -> dict[str, Any]:
    """CPU, library versions and native build: what a cached verdict is valid for."""
    cpu = cpu_info()
    build = llamacpp_build() or {}
    return {
        "cpu_model": cpu.model,
        "cpu_flags": cpu.flags_digest,
        "isa": list(cpu.isa),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "llama_cpp_python": _version("llama_cpp_python"),
        "llamacpp_build": build.get("key", "unrecorded"),
    }


@functools.cache  # the CPU, the libraries and the build do not change under a process
def fingerprint_digest() -> str:
    return hashlib.sha256(json.dumps(fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def build_key(compiler: str, cmake_args: str, version: str) -> str:
    """The cache key of a native llama.cpp wheel: CPU flags, compiler, flags, version."""
    text = "\n".join((cpu_info().flags_digest, compiler, cmake_args, version))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def write_build_record(
    key: str, compiler: str, cmake_args: str, native: bool, prefix: Path | None = None
) -> Path:
    cpu = cpu_info()
    path = (prefix or Path(sys.prefix)) / BUILD_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "key": key,
        "compiler": compiler,
        "cmake_args": cmake_args,
        "native": native,
        "cpu_model": cpu.model,
        "cpu_flags_digest": cpu.flags_digest,
        "isa": list(cpu.isa),
        "llama_cpp_python": _version("llama_cpp_python"),
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m slimserve.engine.machine`: what scripts/setup asks before and after a build."""
    parser = argparse.ArgumentParser(prog="python -m slimserve.engine.machine")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("show", help="the CPU, its instruction sets and the fingerprint")
    key = sub.add_parser("build-key", help="the cache key of a native llama.cpp build")
    record = sub.add_parser("record-build", help="record the llama.cpp build just installed")
    for p in (key, record):
        p.add_argument("--compiler", required=True)
        p.add_argument("--cmake-args", default="")
        p.add_argument("--version", required=True)
    record.add_argument("--portable", action="store_true", help="a runtime-dispatch build")
    args = parser.parse_args(argv)
    if args.cmd == "show":
        cpu = cpu_info()
        print(json.dumps({**fingerprint(), "has_amx": cpu.has_amx}, indent=2))
    elif args.cmd == "build-key":
        print(build_key(args.compiler, args.cmake_args, args.version))
    else:
        k = build_key(args.compiler, args.cmake_args, args.version)
        print(write_build_record(k, args.compiler, args.cmake_args, not args.portable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
