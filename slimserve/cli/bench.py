"""`slimserve bench compare` (versions side by side) and `slimserve bench serve`
(streaming latency and throughput against baselines).

torch and `slimserve.bench` are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from slimserve.cli.common import (
    backend_args,
    default_registry,
    home,
    kv_layout_arg,
    non_negative_int,
    open_registry,
    positive_int,
    positive_int_list,
    registry_arg,
)
from slimserve.cli.compress import evaluation_args


def cmd_bench_compare(args: argparse.Namespace) -> int:
    import torch

    from slimserve.bench.compare import markdown, measure, plot
    from slimserve.compression.evaluate import EvaluateConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EvaluateConfig(speed_tokens=args.speed_tokens, max_chunks=args.max_chunks)
    # Parents load once, on the same device.
    rows = measure(open_registry(args), args.models, cfg, text=args.text, device=args.device)
    print(f"command: {' '.join(sys.argv)}")
    print(f"threads: {torch.get_num_threads()}  torch: {torch.__version__}  device: {args.device}")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _system_list(text: str) -> list[str]:
    """`--systems`: comma-separated names `slimserve.bench.serve.SYSTEMS` knows."""
    from slimserve.bench.serve import SYSTEMS

    systems = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise argparse.ArgumentTypeError(
            f"unknown system {', '.join(unknown) or '(none)'}; choose from {', '.join(SYSTEMS)}"
        )
    return systems


def _systems(asked: list[str]) -> list[str]:
    """The systems asked for, less llama.cpp ones when llama-cpp-python is missing."""
    systems = list(asked)
    llama = [s for s in systems if s.startswith("llama_cpp")]
    if llama and importlib.util.find_spec("llama_cpp") is None:
        print(
            "llama_cpp: llama-cpp-python is not installed (pip install llama-cpp-python; it "
            "compiles llama.cpp from source); skipped",
            file=sys.stderr,
        )
        return [s for s in systems if s not in llama]
    return systems


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from slimserve.bench import serve as bench

    systems = _systems(args.systems)
    if args.draft == "none" and "slimserve_draft" in systems:
        print("slimserve_draft: --draft none; skipped", file=sys.stderr)
        systems.remove("slimserve_draft")
    gguf = args.gguf
    gguf_q8 = None
    if any(s.startswith("llama_cpp") for s in systems):
        from slimserve.bench.worker import requantize_q8_0
        from slimserve.compression.importer import default_gguf_path

        gguf = gguf or default_gguf_path()
        if "llama_cpp_q8" in systems:
            gguf_q8 = requantize_q8_0(gguf, home() / "bench" / f"{gguf.stem}.Q8_0.gguf")
    b = bench.Bench(
        registry=args.registry or default_registry(),
        model=args.model,
        threads=args.threads,
        new_tokens=args.new_tokens,
        concurrency=args.concurrency,
        repeats=args.repeats,
        systems=systems,
        gguf=gguf,
        gguf_q8=gguf_q8,
        max_batch=args.max_batch,
        backend=args.backend,
        hf_model=args.hf_model,
        gguf_type=args.gguf_type,
        draft=args.draft,
        draft_tokens=args.draft_tokens,
        kv_layout=args.kv_layout,
        device=args.device,
    )
    why = "os.cpu_count(), what serve uses" if args.threads == os.cpu_count() else "--threads"
    print(f"threads: {args.threads} per system ({why})", flush=True)
    report = bench.run(b, score=not args.no_score)
    print("\n".join(f"{k}: {v}" for k, v in report["environment"].items()))
    print("\n".join(bench.report_lines(report)))
    for s in report["score"]:
        print(
            f"Score (2 labels) concurrency {s['concurrency']}: p50 {s['p50_ms']:.1f} ms, "
            f"p99 {s['p99_ms']:.1f} ms, {s['per_s']:.1f} req/s"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        bench.plot(report["results"], args.plot)
    return 0


#: `bench serve --systems` when not given: what the targets are judged on.
DEFAULT_SYSTEMS = "slimserve,slimserve_draft,engine,llama_cpp,llama_cpp_q8"


def add_parser(sub: Any) -> None:
    """Add `bench compare` and `bench serve` to the top-level subparsers."""
    bench = sub.add_parser("bench", help="benchmarks (figures side by side in one run)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    p = bsub.add_parser(
        "compare",
        help="versions side by side against their parents: perplexity in and out of domain, "
        "agreement, size, speed",
    )
    p.add_argument("models", nargs="+", help="NAME@REF ...")
    evaluation_args(p)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="PNG: perplexity against decode speed")
    registry_arg(p)
    p.set_defaults(func=cmd_bench_compare)

    p = bsub.add_parser("serve", help="streaming latency/throughput vs baselines")
    p.add_argument("--model", default="smollm2-135m-instruct@production", help="NAME[@REF]")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="threads of every system (default: os.cpu_count(), what serve uses)",
    )
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--concurrency", type=positive_int_list, default=[1, 16], help="comma-separated")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--max-batch", type=positive_int, default=16)
    p.add_argument(
        "--systems",
        type=_system_list,
        default=DEFAULT_SYSTEMS.split(","),
        help="comma-separated: slimserve (the server: gRPC + engine process), "
        "slimserve_draft (the server with --draft), engine (in-process), engine_ipc (its "
        "own process, no gRPC), hf_generate, llama_cpp (the shipped GGUF), llama_cpp_q8 (it "
        f"re-encoded to Q8_0) (default: {DEFAULT_SYSTEMS})",
    )
    p.add_argument(
        "--draft",
        default="ngram",
        help="slimserve_draft's `serve --draft`: ngram (prompt lookup, no model), NAME@REF "
        "(a draft model sharing the tokenizer) or none (skip slimserve_draft)",
    )
    p.add_argument(
        "--draft-tokens", type=positive_int, default=4, help="slimserve_draft's --draft-tokens"
    )
    p.add_argument("--gguf", type=Path, help="GGUF for llama_cpp (default: the shipped one)")
    backend_args(
        p,
        "slimserve's serving backend for the slimserve and engine systems",
        "llama.cpp backend weights for the slimserve and engine systems",
    )
    p.add_argument("--hf-model", help="NAME@REF for hf_generate (default: --model)")
    kv_layout_arg(
        p,
        "slimserve's and the engine's llama.cpp KV cache (serve --kv-layout); llama.cpp's "
        "own loop is always split per sequence",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where slimserve, the engine and hf_generate run: cpu, cuda or cuda:N (serve "
        "--device; bfloat16 on CUDA, as serve's --dtype auto); llama.cpp runs on the CPU",
    )
    p.add_argument("--no-score", action="store_true", help="skip the Score measurement")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    registry_arg(p)
    p.set_defaults(func=cmd_bench_serve)
    p = bsub.add_parser("step", help="where a decode step's milliseconds go (in-process)")
    p.add_argument("--model", default="smollm2-135m-instruct@production", help="NAME[@REF]")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--concurrency", type=positive_int_list, default=[1, 16], help="comma-separated")
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--draft", help="also run with this drafter: ngram or NAME@REF")
    kv_layout_arg(p, "llama.cpp's KV cache (as serve --kv-layout)")
    p.add_argument(
        "--max-seq-len",
        type=non_negative_int,
        default=0,
        help="context per sequence (as serve; 0 = fit the budget)",
    )
    registry_arg(p)
    p.set_defaults(func=cmd_bench_step)


def cmd_bench_step(args: argparse.Namespace) -> int:
    from slimserve.bench.step import run_step_profile

    return run_step_profile(
        args.registry or default_registry(),
        args.model,
        threads=args.threads,
        concurrency=args.concurrency,
        new_tokens=args.new_tokens,
        draft=args.draft,
        kv_layout=args.kv_layout,
        max_seq_len=args.max_seq_len,
    )
