"""The `slimserve` command. Flags and environment are read here, and only here.

Subcommands import what they need lazily, so client commands (`generate`, `models`,
`score`) never import torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimserve.registry.store import Registry

ENV_REGISTRY = "SLIMSERVE_REGISTRY"
ENV_HOME = "SLIMSERVE_HOME"
ENV_TARGET = "SLIMSERVE_TARGET"
ENV_AUTH_TOKEN = "SLIMSERVE_AUTH_TOKEN"
ENV_ADMIN_TOKEN = "SLIMSERVE_ADMIN_TOKEN"


def default_registry() -> Path:
    if os.environ.get(ENV_REGISTRY):
        return Path(os.environ[ENV_REGISTRY]).expanduser()
    home = Path(os.environ.get(ENV_HOME) or Path.home() / ".slimserve").expanduser()
    return home / "registry"


def _registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        type=Path,
        default=None,
        help=f"registry directory (default: ${ENV_REGISTRY}, else $SLIMSERVE_HOME/registry, "
        "else ~/.slimserve/registry)",
    )


def _target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=os.environ.get(ENV_TARGET, "127.0.0.1:50051"),
        help="server address HOST:PORT; several, comma-separated, are balanced round-robin "
        f"(default: ${ENV_TARGET} or 127.0.0.1:50051)",
    )
    p.add_argument("--token-file", type=Path, default=None, help="file holding a bearer token")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    p.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate")
    p.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM client key (mutual TLS)")


def _open_registry(args: argparse.Namespace) -> Any:
    from slimserve.registry.store import Registry

    return Registry(args.registry or default_registry())


def _client(args: argparse.Namespace) -> Any:
    from slimserve.clients import Client
    from slimserve.clients.client import tls_credentials

    token = args.token_file.read_text().strip() if args.token_file else None
    credentials = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        credentials = tls_credentials(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    return Client(args.target, timeout=args.timeout, token=token, credentials=credentials)


# ---- registry ----------------------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> int:
    from slimserve.compression.importer import DEFAULT_MODEL_NAME, import_default, import_model

    registry = _open_registry(args)
    if args.default:
        name = args.name or DEFAULT_MODEL_NAME
        if args.if_missing and registry.versions(name):
            print(_already_imported(registry, name))
            return 0
        art = import_default(registry, name)
    else:
        if not args.source or not args.name:
            raise SystemExit("import needs SOURCE and --name (or --default)")
        if args.if_missing and registry.versions(args.name):
            print(_already_imported(registry, args.name))
            return 0
        art = import_model(registry, args.source, args.name, revision=args.revision)
    print(f"imported {art.ref} digest {art.digest[:12]} into {registry.root}")
    return 0


def _already_imported(registry: Registry, name: str) -> str:
    """Names the imported version (the first, which has no parent), not the newest one."""
    versions = registry.versions(name)
    first = registry.get(name, str(versions[0]))
    return (
        f"{first.ref} already imported ({first.digest[:12]}); {name} has {len(versions)} "
        "version(s); skipped"
    )


def cmd_registry(args: argparse.Namespace) -> int:
    from slimserve.registry.store import describe, parse_model_ref

    registry = _open_registry(args)
    if args.action == "list":
        rows = [describe(a, registry.aliases_of(a.name, a.version)) for a in registry.artifacts()]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'model':32} {'aliases':20} {'parent':28} {'recipe':18} {'size MB':>8}  digest")
        for r in rows:
            print(
                f"{r['ref']:32} {','.join(r['aliases']):20} {r['parent'] or '-':28} "
                f"{(r['recipe'] or {}).get('name', '-'):18} {r['bytes'] / 1e6:8.1f}  "
                f"{r['digest'][:12]}"
            )
        return 0
    name, ref = parse_model_ref(args.model)
    if args.action == "show":
        art = registry.get(name, ref)
        print(json.dumps({"digest": art.digest, **art.manifest.to_dict()}, indent=2))
    elif args.action == "verify":
        art = registry.get(name, ref)
        art.verify()
        print(f"{art.ref}: {len(art.files)} files OK ({art.digest[:12]})")
    elif args.action == "alias":
        if args.version is None or args.alias is None:
            raise SystemExit("usage: slimserve registry alias NAME VERSION ALIAS")
        registry.set_alias(name, args.alias, int(args.version))
        print(f"{name}@{args.alias} -> {name}@{args.version}")
    return 0


# ---- compression -------------------------------------------------------------------------
def _rich_progress() -> Any:
    """A rich progress display and a `progress(label, done, total)` callback for it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(label: str, done: int, total: int) -> None:
        key = label.split(" (", 1)[0].split(" loss", 1)[0]
        if key not in tasks:
            tasks[key] = bar.add_task(label, total=total)
        bar.update(tasks[key], completed=done, total=total, description=label)

    return bar, update


def cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from slimserve.compression.recipe import CompressJob, compress, load_recipe
    from slimserve.registry.store import parse_model_ref

    recipe = load_recipe(args.recipe)  # every stage validated before any work
    registry = _open_registry(args)
    name, ref = parse_model_ref(args.source)
    parent = registry.get(name, ref)
    target = args.to or name
    if args.skip_existing:
        for art in registry.artifacts():
            r = art.manifest.recipe
            same = r.get("digest") == recipe.digest and art.manifest.parent == parent.ref
            if art.name == target and same:
                print(f"{art.ref} already made from {parent.ref} by recipe {recipe.name}")
                if args.alias:
                    registry.set_alias(target, args.alias, art.version)
                return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    job = CompressJob(
        recipe=recipe,
        parent=parent,
        to_name=target,
        data=args.data,
        eval_text=args.eval_text,
        device=args.device,
    )
    bar, update = _rich_progress()
    with bar:
        art = compress(registry, job, update)
    if args.alias:
        registry.set_alias(art.name, args.alias, art.version)
    m = art.manifest.metrics
    print(
        f"published {art.ref} (parent {parent.ref}, recipe {recipe.name}): "
        f"perplexity {m['perplexity']:.2f}, {m['parameters'] / 1e6:.1f} M params, "
        f"{m['bytes'] / 1e6:.0f} MB, {m.get('decode_tokens_per_s', 0):.1f} tok/s decode"
    )
    return 0


def _evaluate_ref(args: argparse.Namespace, text: str) -> dict[str, Any]:
    from slimserve.compression.evaluate import EvaluateConfig, evaluate
    from slimserve.registry.artifact import load_model
    from slimserve.registry.store import parse_model_ref

    registry = _open_registry(args)
    art = registry.get(*parse_model_ref(text))
    model, tok = load_model(art)
    size = sum(int(f["size"]) for r, f in art.files.items() if r.endswith(".safetensors"))
    cfg = EvaluateConfig(speed_tokens=args.speed_tokens, max_chunks=args.max_chunks)
    return {"model": art.ref, **evaluate(model, tok, cfg, text=args.text, model_bytes=size)}


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = _evaluate_ref(args, args.model)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:22} {v}")
    return 0


def cmd_bench_compare(args: argparse.Namespace) -> int:
    import torch

    from slimserve.bench.compare import markdown, plot

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [_evaluate_ref(args, ref) for ref in args.models]
    print(f"command: {' '.join(sys.argv)}")
    print(f"threads: {torch.get_num_threads()}  torch: {torch.__version__}")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0


# ---- server ------------------------------------------------------------------------------
def _tokens(path: Path | None, env: str) -> frozenset[str]:
    """Tokens from a file (one per line, '#' comments) or else one from the environment."""
    if path is not None:
        lines = (line.strip() for line in path.read_text().splitlines())
        return frozenset(line for line in lines if line and not line.startswith("#"))
    value = os.environ.get(env, "").strip()
    return frozenset({value}) if value else frozenset()


def serve_config(args: argparse.Namespace) -> Any:
    """The one `ServerConfig` that `serve` flags and environment describe."""
    from slimserve.engine.config import ModelConfig
    from slimserve.server.config import AuthConfig, Limits, ServerConfig, TlsConfig

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-cert and --tls-key go together")
        tls = TlsConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
    elif args.tls_client_ca:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
    config = ServerConfig(
        registry=args.registry or default_registry(),
        models=tuple(args.model),
        host=args.host,
        port=args.port,
        threads=args.threads,
        grace_s=args.grace,
        model=ModelConfig(
            device=args.device,
            dtype=args.dtype,
            backend=args.backend,
            gguf_type=args.gguf_type,
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            kv_cache_mb=args.kv_cache_mb,
            max_queue=args.max_queue,
        ),
        limits=Limits(
            max_new_tokens=args.max_new_tokens_limit,
            default_max_new_tokens=min(args.default_max_new_tokens, args.max_new_tokens_limit),
            max_prompt_tokens=args.max_prompt_tokens,
            max_stop_sequences=args.max_stop_sequences,
            max_stop_sequence_chars=args.max_stop_sequence_chars,
            max_top_n=args.max_top_n,
            max_labels=args.max_labels,
            max_message_bytes=args.max_message_bytes,
        ),
        auth=AuthConfig(
            tokens=_tokens(args.auth_token_file, ENV_AUTH_TOKEN),
            admin_tokens=_tokens(args.admin_token_file, ENV_ADMIN_TOKEN),
        ),
        tls=tls,
        metrics_port=args.metrics_port,
    )
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    config = serve_config(args)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    from slimserve.server.app import serve

    return asyncio.run(serve(config))


# ---- client ------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from slimserve.clients import ChatMessage, Sampling

    sampling = Sampling(
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    prompt: Any = [ChatMessage("user", args.prompt)] if args.chat else args.prompt
    options = dict(
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        stop=args.stop or (),
    )
    with _client(args) as client:
        if args.stream:
            last = None
            for chunk in client.stream(prompt, **options):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.model:
                    header = chunk
                last = chunk
            sys.stdout.write("\n")
            if last is not None and last.timings is not None:
                t = last.timings
                tps = (last.generated_tokens - 1) / (t.decode_ms / 1e3) if t.decode_ms else 0.0
                print(
                    f"[{header.model} stop={last.stop_reason} tokens={last.generated_tokens} "
                    f"ttft={t.ttft_ms:.0f}ms decode={tps:.1f} tok/s]",
                    file=sys.stderr,
                )
        else:
            g = client.generate(prompt, **options)
            print(g.text)
            print(
                f"[{g.model} stop={g.stop_reason} tokens={g.generated_tokens} "
                f"total={g.timings.total_ms:.0f}ms]",
                file=sys.stderr,
            )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models()
    if args.json:
        from dataclasses import asdict

        print(json.dumps([asdict(m) for m in models], indent=2))
        return 0
    for m in models:
        default = " (default)" if m.is_default else ""
        print(
            f"{m.ref}{default} aliases={','.join(m.aliases) or '-'} backend={m.backend} "
            f"device={m.device} dtype={m.dtype} quant={m.quantization} ctx={m.max_context} "
            f"batch={m.max_batch} digest={m.digest[:12]}"
        )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    with _client(args) as client:
        r = client.score(args.prompt, args.labels, model=args.model)
    for s in r.scores:
        print(f"{s.label!r}\tp={s.probability:.4f}\tlogprob={s.logprob:.4f}")
    print(f"[{r.model} {r.latency_ms:.1f}ms]", file=sys.stderr)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.wait:
            client.wait_ready(args.wait)
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import importlib.util

    from slimserve.bench import serve as bench

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    llama = [s for s in systems if s.startswith("llama_cpp")]
    if llama and importlib.util.find_spec("llama_cpp") is None:
        print(
            "llama_cpp: llama-cpp-python is not installed (pip install llama-cpp-python; it "
            "compiles llama.cpp from source); skipped",
            file=sys.stderr,
        )
        systems = [s for s in systems if s not in llama]
        llama = []
    gguf = args.gguf
    gguf_q8 = None
    if llama:
        from slimserve.bench.worker import requantize_q8_0
        from slimserve.compression.importer import default_gguf_path

        gguf = gguf or default_gguf_path()
        if "llama_cpp_q8" in systems:
            home = Path(os.environ.get(ENV_HOME) or Path.home() / ".slimserve").expanduser()
            gguf_q8 = requantize_q8_0(gguf, home / "bench" / f"{gguf.stem}.Q8_0.gguf")
    b = bench.Bench(
        registry=args.registry or default_registry(),
        model=args.model,
        threads=args.threads,
        new_tokens=args.new_tokens,
        concurrency=[int(c) for c in args.concurrency.split(",")],
        repeats=args.repeats,
        systems=systems,
        gguf=gguf,
        gguf_q8=gguf_q8,
        max_batch=args.max_batch,
        backend=args.backend,
        hf_model=args.hf_model,
        gguf_type=args.gguf_type,
    )
    report = bench.run(b, score=not args.no_score)
    env = report["environment"]
    print("\n".join(f"{k}: {v}" for k, v in env.items()))
    table = bench.markdown(report["results"])
    print()
    print(table)
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


# ---- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="log lines on stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="import a base model into the registry")
    p.add_argument("source", nargs="?", help="HF model directory, .gguf file, or hub id")
    p.add_argument("--name", help="registry name for the model")
    p.add_argument("--default", action="store_true", help="import SmolLM2-135M-Instruct")
    p.add_argument("--revision", help="hub revision (hub ids only)")
    p.add_argument("--if-missing", action="store_true", help="do nothing if NAME exists")
    _registry_arg(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("registry", help="list, show, verify and alias registry versions")
    p.add_argument("action", choices=["list", "show", "verify", "alias"])
    p.add_argument("model", nargs="?", default="", help="NAME[@VERSION|@ALIAS]")
    p.add_argument("version", nargs="?", help="(alias) version number")
    p.add_argument("alias", nargs="?", help="(alias) alias name")
    p.add_argument("--json", action="store_true")
    _registry_arg(p)
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("compress", help="run a recipe and publish a new version")
    p.add_argument("recipe", type=Path, help="recipe TOML (see recipes/)")
    p.add_argument("--from", dest="source", required=True, help="parent NAME[@REF]")
    p.add_argument("--to", help="name to publish under (default: the parent's)")
    p.add_argument("--data", type=Path, help="training text (.txt or .jsonl with 'text')")
    p.add_argument("--eval-text", type=Path, help="held-out text for perplexity")
    p.add_argument("--alias", help="point this alias at the new version")
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing if a version made from this parent by this recipe exists",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    _registry_arg(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="perplexity, size and speed of a version")
    p.add_argument("model", help="NAME[@REF]")
    p.add_argument("--text", type=Path, help="held-out text (default: pydoc eval split)")
    p.add_argument("--speed-tokens", type=int, default=128)
    p.add_argument("--max-chunks", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    _registry_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve registry models over gRPC")
    p.add_argument("--model", action="append", required=True, help="NAME[@VERSION|@ALIAS]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "hf", "llama", "llamacpp"],
        help="auto: llama.cpp on CPU when installed, else the torch Llama fast path, else eager",
    )
    p.add_argument(
        "--gguf-type",
        default="auto",
        choices=["auto", "q8_0", "q4_1", "f16", "f32"],
        help="llama.cpp weight format; auto keeps the artifact's precision (int8 -> q8_0)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--max-batch", type=int, default=16, help="concurrent sequences")
    p.add_argument(
        "--max-seq-len", type=int, default=0, help="context per sequence (0 = fit the budget)"
    )
    p.add_argument("--kv-cache-mb", type=int, default=1024, help="KV-cache budget per model, MiB")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests at most")
    p.add_argument("--grace", type=float, default=10.0, help="shutdown grace seconds")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default: off)")
    g = p.add_argument_group("limits (each exceeded one is INVALID_ARGUMENT naming it)")
    g.add_argument("--max-new-tokens-limit", type=int, default=2048)
    g.add_argument("--default-max-new-tokens", type=int, default=128)
    g.add_argument("--max-prompt-tokens", type=int, default=4096)
    g.add_argument("--max-stop-sequences", type=int, default=16)
    g.add_argument("--max-stop-sequence-chars", type=int, default=256)
    g.add_argument("--max-top-n", type=int, default=20)
    g.add_argument("--max-labels", type=int, default=32)
    g.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    g = p.add_argument_group("security")
    g.add_argument(
        "--auth-token-file",
        type=Path,
        help=f"bearer tokens for generation, one per line (default: ${ENV_AUTH_TOKEN})",
    )
    g.add_argument(
        "--admin-token-file",
        type=Path,
        help=f"bearer tokens for LoadModel/UnloadModel (default: ${ENV_ADMIN_TOKEN})",
    )
    g.add_argument("--tls-cert", type=Path, help="PEM server certificate chain")
    g.add_argument("--tls-key", type=Path, help="PEM server private key")
    g.add_argument("--tls-client-ca", type=Path, help="PEM CA for client certificates (mTLS)")
    _registry_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="complete a prompt through a server")
    p.add_argument("prompt")
    p.add_argument("--model", default="", help="NAME[@VERSION|@ALIAS] (default: server's)")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--chat", action="store_true", help="send as a user chat message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    _target_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("models", help="list the models a server holds")
    p.add_argument("--json", action="store_true")
    _target_arg(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("score", help="probabilities of labels after a prompt")
    p.add_argument("prompt")
    p.add_argument("labels", nargs="+")
    p.add_argument("--model", default="")
    _target_arg(p)
    p.set_defaults(func=cmd_score)

    bench = sub.add_parser("bench", help="benchmarks (figures side by side in one run)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    p = bsub.add_parser("compare", help="versions side by side: perplexity, size, speed")
    p.add_argument("models", nargs="+", help="NAME@REF ...")
    p.add_argument("--text", type=Path, help="held-out text (default: pydoc eval split)")
    p.add_argument("--speed-tokens", type=int, default=128)
    p.add_argument("--max-chunks", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="PNG: perplexity against decode speed")
    _registry_arg(p)
    p.set_defaults(func=cmd_bench_compare)

    p = bsub.add_parser("serve", help="streaming latency/throughput vs baselines")
    p.add_argument("--model", default="smollm2-135m-instruct", help="NAME[@REF]")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument(
        "--systems",
        default="slimserve,engine,hf_generate,llama_cpp,llama_cpp_q8",
        help="comma-separated: slimserve, engine, hf_generate, llama_cpp (the shipped "
        "GGUF), llama_cpp_q8 (it re-encoded to Q8_0)",
    )
    p.add_argument("--gguf", type=Path, help="GGUF for llama_cpp (default: the shipped one)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "hf", "llama", "llamacpp"],
        help="slimserve's serving backend for the slimserve and engine systems",
    )
    p.add_argument("--hf-model", help="NAME@REF for hf_generate (default: --model)")
    p.add_argument(
        "--gguf-type",
        default="auto",
        choices=["auto", "q8_0", "q4_1", "f16", "f32"],
        help="llama.cpp backend weights for the slimserve and engine systems",
    )
    p.add_argument("--no-score", action="store_true", help="skip the Score measurement")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    _registry_arg(p)
    p.set_defaults(func=cmd_bench_serve)

    from slimserve.cli.fraud import add_fraud_commands

    add_fraud_commands(sub, _registry_arg, _target_arg)

    p = sub.add_parser("health", help="a server's gRPC health status")
    p.add_argument("--service", default="", help="service name ('' = whole server)")
    p.add_argument("--wait", type=float, default=0.0, help="wait up to N seconds for SERVING")
    _target_arg(p)
    p.set_defaults(func=cmd_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from slimserve.server import logs  # stdlib only: client commands stay torch-free

    logs.configure(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from slimserve.clients.errors import ClientError

        if isinstance(exc, ClientError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            from slimserve.compression.errors import CompressionError
            from slimserve.registry.errors import RegistryError
        except ImportError:  # pragma: no cover
            raise exc from None
        if isinstance(exc, CompressionError | RegistryError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
