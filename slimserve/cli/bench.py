"""`slimserve bench compare` (versions side by side), `slimserve bench serve` (streaming
latency and throughput against baselines), `bench step` and `bench grammar`.

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


def llama_server_cache() -> Path:
    """Where llama-server builds are cached, beside the llama-cpp-python wheels
    (scripts/build-llamacpp): $XDG_CACHE_HOME/slimserve/llama-server."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimserve" / "llama-server"


def _llama_server(args: argparse.Namespace, registry: Path) -> dict[str, Any] | None:
    """The binary, GGUF and chat template `llama_server` needs (found, built and exported
    once), or None after printing why it is skipped."""
    from slimserve.bench import llama_server as ls
    from slimserve.engine.config import ModelConfig

    try:
        binary = args.llama_server or ls.find_binary(llama_server_cache())
        if binary is None and not args.no_build_llama_server:
            binary = ls.build(llama_server_cache())
        if binary is None:
            raise RuntimeError(
                f"not on PATH and not built for this CPU in {llama_server_cache()} "
                "(--no-build-llama-server; scripts/build-llama-server builds it)"
            )
        config = _served_config(args, ModelConfig)
        gguf, template, plan = ls.export_served_gguf(
            registry, args.model, config, home() / "bench" / "gguf"
        )
    except Exception as exc:  # a clear line, then the race goes on without it
        print(f"llama_server: {exc}; skipped", file=sys.stderr)
        return None
    print(f"llama_server: {binary} on {gguf} (slimserve's {plan} weights)", file=sys.stderr)
    return {"llama_server": Path(binary), "served_gguf": gguf, "chat_template": template}


def _chat_peer(args: argparse.Namespace, registry: Path, systems: list[str]) -> dict[str, Any]:
    """What the chat probe's in-process llama-cpp-python peer needs (the GGUF slimserve
    serves and its chat template, exported once), or {} after printing why it is skipped.
    It runs where the chat probe does (`--chat-probe` > 0 and a server it times)."""
    from slimserve.bench import llama_server as ls
    from slimserve.bench.serve import CHAT_PEER, CHAT_PROBED
    from slimserve.engine.config import ModelConfig

    if not args.chat_probe or not set(CHAT_PROBED) & set(systems):
        return {}
    if importlib.util.find_spec("llama_cpp") is None:
        print(
            f"{CHAT_PEER}: llama-cpp-python is not installed (pip install llama-cpp-python); "
            "the chat probe runs without its in-process peer",
            file=sys.stderr,
        )
        return {}
    try:
        config = _served_config(args, ModelConfig)
        gguf, template, plan = ls.export_served_gguf(
            registry, args.model, config, home() / "bench" / "gguf"
        )
    except Exception as exc:  # a clear line, then the probe goes on without it
        print(f"{CHAT_PEER}: {exc}; the chat probe runs without its in-process peer",
              file=sys.stderr)  # fmt: skip
        return {}
    print(
        f"{CHAT_PEER}: llama-cpp-python in-process on {gguf} (slimserve's {plan} weights), "
        "in the chat probe",
        file=sys.stderr,
    )
    return {"chat_peer": True, "served_gguf": gguf, "chat_template": template}


def _served_config(args: argparse.Namespace, model_config: Any) -> Any:
    """The model config the bench's `serve` gets (to find the plan it qualifies)."""
    from slimserve.bench.worker import stream_tokens

    return model_config.of(
        device="cpu",
        backend=args.backend,
        gguf_type=args.gguf_type,
        max_batch=args.max_batch,
        max_seq_len=stream_tokens(args.new_tokens),
        kv_layout=args.kv_layout,
    )


def _prompt_ids(registry: Path, ref: str) -> dict[str, list[int]]:
    """Each benchmark prompt's token ids, by the artifact's own tokenizer."""
    from slimserve.bench.serve import PROMPTS
    from slimserve.engine.tokenizer import load_tokenizer
    from slimserve.registry.store import Registry, parse_model_ref

    tok = load_tokenizer(Registry(registry).get(*parse_model_ref(ref)).path)
    return {p: list(tok(p, add_special_tokens=True)["input_ids"]) for p in PROMPTS}


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import torch

    from slimserve.bench import serve as bench

    torch.set_num_threads(args.threads)  # as `serve --threads`: the plan qualified for it
    registry = args.registry or default_registry()
    systems = _systems(args.systems)
    if args.draft == "none" and "slimserve_draft" in systems:
        print("slimserve_draft: --draft none; skipped", file=sys.stderr)
        systems.remove("slimserve_draft")
    extra: dict[str, Any] = {}
    if bench.LLAMA_SERVER in systems:
        found = _llama_server(args, registry)
        if found is None:
            systems.remove(bench.LLAMA_SERVER)
        else:
            extra |= found
    if {bench.LLAMA_SERVER, "slimserve_http"} & set(systems):
        extra["prompt_ids"] = _prompt_ids(registry, args.model)
    extra |= _chat_peer(args, registry, systems)
    gguf = args.gguf
    gguf_q8 = None
    if any(s.startswith("llama_cpp") for s in systems):
        from slimserve.bench.worker import requantize_q8_0
        from slimserve.compression.importer import default_gguf_path

        gguf = gguf or default_gguf_path()
        if "llama_cpp_q8" in systems:
            gguf_q8 = requantize_q8_0(gguf, home() / "bench" / f"{gguf.stem}.Q8_0.gguf")
    b = bench.Bench(
        registry=registry,
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
        chat_probe=args.chat_probe,
        mixed_streams=args.mixed_streams,
        mixed_baseline=not args.no_mixed_baseline,
        decode_threads=args.decode_threads,
        **extra,
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
        "slimserve_draft (the server with --draft), slimserve_http (its OpenAI door, "
        "through the openai SDK), slimserve_nopool (the server without persistent ggml "
        "threadpools and threads by phase), engine (in-process), engine_nopool (likewise "
        "without), engine_ipc (its own process, no gRPC), hf_generate, llama_cpp (the "
        "shipped GGUF), llama_cpp_q8 (it re-encoded to Q8_0), llama_server (llama.cpp's "
        "own server on the weights slimserve serves, through the openai SDK), mixed "
        "(streams while long prompts and a Score arrive: their gaps), prefix (TTFT of a "
        "~1,000-token shared document + a new question against a new document each time) "
        f"(default: {DEFAULT_SYSTEMS})",
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
    p.add_argument(
        "--llama-server",
        type=Path,
        help="llama_server: this binary (default: llama-server on PATH, else one built for "
        "this CPU from llama-cpp-python's own llama.cpp sources, once, and cached)",
    )
    p.add_argument(
        "--no-build-llama-server",
        action="store_true",
        help="llama_server: skip it rather than build it when none is found",
    )
    p.add_argument(
        "--chat-probe",
        type=non_negative_int,
        default=30,
        help="one-token chat requests timed on each server system, one after another, and "
        "on llama-cpp-python's Llama.create_chat_completion in a process of its own on the "
        "GGUF slimserve serves (llama_cpp_python, when installed and slimserve serves a "
        "llama.cpp plan); slimserve's p50 over gRPC and HTTP is held against its (0: none)",
    )
    p.add_argument(
        "--mixed-streams",
        type=positive_int,
        default=2,
        help="mixed: streams running while the long prompts and the Score arrive",
    )
    p.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="threads of a one-token pass for slimserve and engine (as serve --decode-threads; "
        "0: what qualification measured fastest)",
    )
    p.add_argument(
        "--no-mixed-baseline",
        action="store_true",
        help="mixed: skip the baseline server that feeds prompts whole (its long prompts' "
        "TTFT is what the scenario's is judged against)",
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    registry_arg(p)
    p.set_defaults(func=cmd_bench_serve)
    _add_small_benches(bsub)


def _add_small_benches(bsub: Any) -> None:
    """`bench ipc`, `bench step` and `bench grammar`."""
    p = bsub.add_parser("ipc", help="the engine process's wire: encode + decode per step")
    p.add_argument("--streams", type=positive_int_list, default=[1, 16])
    p.add_argument("--repeats", type=positive_int, default=2000)
    p.set_defaults(func=cmd_bench_ipc)
    p = bsub.add_parser("structured", help="structured output's cost to a stream's ITL")
    p.add_argument("--model", default="smollm2-135m-instruct@production", help="NAME[@REF]")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.add_argument("--concurrency", type=positive_int_list, default=[1, 16], help="comma-separated")
    p.add_argument("--new-tokens", type=positive_int, default=96)
    p.add_argument("--rounds", type=positive_int, default=3)
    registry_arg(p)
    p.set_defaults(func=cmd_bench_structured)
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

    p = bsub.add_parser(
        "grammar", help="structured output's cost per token and per step (no weights loaded)"
    )
    p.add_argument("--model", default="smollm2-135m-instruct@production", help="NAME[@REF]")
    p.add_argument("--batch", type=positive_int, default=16, help="sequences in the batch step")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", type=Path)
    registry_arg(p)
    p.set_defaults(func=cmd_bench_grammar)


def cmd_bench_grammar(args: argparse.Namespace) -> int:
    from slimserve.bench.grammar import run

    return run(
        args.registry or default_registry(),
        args.model,
        batch=args.batch,
        repeats=args.repeats,
        threads=args.threads,
        json_out=args.json,
    )


def cmd_bench_ipc(args: argparse.Namespace) -> int:
    from slimserve.bench import ipc

    rows = ipc.measure(tuple(args.streams), args.repeats)
    print(f"command: {' '.join(sys.argv)}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(ipc.markdown(rows))
    return 0


def cmd_bench_structured(args: argparse.Namespace) -> int:
    import torch

    from slimserve.bench.structured import markdown, measure
    from slimserve.engine.config import ModelConfig
    from slimserve.engine.frontend import Frontend
    from slimserve.engine.loader import load
    from slimserve.registry.store import parse_model_ref

    torch.set_num_threads(args.threads)
    name, ref = parse_model_ref(args.model)
    artifact = open_registry(args).get(name, ref)
    config = ModelConfig.of(device="cpu", max_batch=max(args.concurrency), qualify=False)
    front = Frontend.of(load(artifact, config))
    try:
        rows = measure(front, args.concurrency, args.new_tokens, args.rounds)
    finally:
        front.shutdown()
    print(f"command: {' '.join(sys.argv)}")
    print(f"{artifact.ref} on {front.info.kernels}; load average {os.getloadavg()[0]:.2f}")
    print(markdown(rows))
    return 0


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
