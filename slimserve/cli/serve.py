"""`slimserve serve`: the flags, token files and environment that make one `ServerConfig`.

`serve_config` is the only place the server's settings are read. Tokens come from a file
(`--auth-token-file`, `--admin-token-file`) or else the environment (`SLIMSERVE_AUTH_TOKEN`,
`SLIMSERVE_ADMIN_TOKEN`), in the format `server.config.parse_tokens` reads; one that is
given but holds no token is a usage error, so authentication never switches itself off.
Imports `slimserve.server`, `slimserve.engine` and torch only inside the functions.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from slimserve.cli.common import (
    ENV_ADMIN_TOKEN,
    ENV_AUTH_TOKEN,
    ENV_METRICS_TOKEN,
    UsageError,
    backend_args,
    check_pair,
    default_registry,
    home,
    kv_layout_arg,
    non_negative_float,
    non_negative_int,
    port,
    positive_float,
    positive_int,
    read_text,
    registry_arg,
)


def tokens_from(path: Path | None, flag: str, env: str, role: str) -> dict[str, str]:
    """`{token: label}` from the file `flag` names, else from `$env`; {} when neither is
    given. Raises UsageError when the one given holds no token or a malformed line."""
    if path is not None:
        text, source = read_text(path, flag), f"{flag} {path}"
    elif env in os.environ:
        text, source = os.environ[env], f"${env}"
    else:
        return {}
    from slimserve.server.config import parse_tokens

    try:
        tokens = parse_tokens(text, role)
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None
    if not tokens:
        raise UsageError(
            f"{source} holds no token (only blank or '#' lines), which would turn "
            "authentication off: put a token in it (`openssl rand -hex 32`) or leave it out"
        )
    return tokens


def metrics_token_from(path: Path | None) -> str | None:
    """The one token in `--metrics-token-file`, else `$SLIMSERVE_METRICS_TOKEN`, else None."""
    if path is not None:
        text, source = read_text(path, "--metrics-token-file"), f"--metrics-token-file {path}"
    elif ENV_METRICS_TOKEN in os.environ:
        text, source = os.environ[ENV_METRICS_TOKEN], f"${ENV_METRICS_TOKEN}"
    else:
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise UsageError(f"{source} must hold exactly one token line, found {len(lines)}")
    return lines[0]


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


def _tls(args: argparse.Namespace) -> Any:
    from slimserve.server.config import TlsConfig

    check_pair(args, "tls_cert", "tls_key")
    if args.tls_cert is None:
        if args.tls_client_ca:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    return TlsConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)


def serve_config(args: argparse.Namespace) -> Any:
    """The one `ServerConfig` that `serve` flags and environment describe.

    Raises UsageError for a value the config refuses (its message names the fix)."""
    from slimserve.engine.config import ModelConfig
    from slimserve.server.config import (
        AuthConfig,
        Connections,
        HttpTransport,
        Limits,
        ServerConfig,
    )

    users = tokens_from(args.auth_token_file, "--auth-token-file", ENV_AUTH_TOKEN, "user")
    admins = tokens_from(args.admin_token_file, "--admin-token-file", ENV_ADMIN_TOKEN, "admin")
    registry, models, qualify_cache = _models(args)
    try:
        return ServerConfig(
            registry=registry,
            models=models,
            qualify_cache=qualify_cache,
            host=args.host,
            port=args.port,
            threads=args.threads,
            grace_s=args.grace,
            model=ModelConfig.of(
                device=args.device,
                dtype=args.dtype,
                backend=args.backend,
                gguf_type=args.gguf_type,
                max_batch=args.max_batch,
                max_seq_len=args.max_seq_len,
                kv_cache_mb=args.kv_cache_mb,
                kv_layout=args.kv_layout,
                max_queue=args.max_queue,
                score_step_tokens=args.score_step_tokens,
                max_score_tokens=args.max_score_tokens,
                max_step_ms=args.max_step_ms,
                prefix_cache=not args.no_prefix_cache,
                draft=None if args.draft in (None, "none") else args.draft,
                draft_tokens=args.draft_tokens,
                draft_policy=args.draft_policy,
                decode_threads=args.decode_threads,
                ggml_threadpool=not args.no_ggml_threadpool,
                step_timeout_s=args.engine_step_timeout,
                crash_verdict_ttl_s=args.crash_verdict_ttl,
            ),
            limits=Limits(
                max_new_tokens=args.max_new_tokens_limit,
                default_max_new_tokens=min(args.default_max_new_tokens, args.max_new_tokens_limit),
                max_prompt_tokens=args.max_prompt_tokens,
                max_stop_sequences=args.max_stop_sequences,
                max_stop_sequence_chars=args.max_stop_sequence_chars,
                max_top_n=args.max_top_n,
                max_labels=args.max_labels,
                max_n=args.max_n,
                max_message_bytes=args.max_message_bytes,
            ),
            connections=Connections(
                max_concurrent_streams=args.max_concurrent_streams,
                max_connection_age_s=args.max_connection_age,
                max_connection_age_grace_s=args.max_connection_age_grace,
                keepalive_time_s=args.keepalive_time,
                keepalive_timeout_s=args.keepalive_timeout,
                min_client_ping_interval_s=args.min_client_ping_interval,
            ),
            auth=AuthConfig(
                tokens=frozenset(users),
                admin_tokens=frozenset(admins),
                labels={**users, **admins},
            ),
            tls=_tls(args),
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            metrics_token=metrics_token_from(args.metrics_token_file),
            http_port=args.http_port,
            http=HttpTransport(
                allowed_hosts=_names(args.http_allowed_hosts),
                cors_origins=_names(args.http_cors_origins),
                header_timeout_s=args.http_header_timeout,
                body_timeout_s=args.http_body_timeout,
                idle_timeout_s=args.http_idle_timeout,
                max_connections=args.http_max_connections,
            ),
            allow_model_control=args.allow_model_control,
            allow_insecure_tokens=args.allow_insecure_tokens,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _models(args: argparse.Namespace) -> tuple[Path, tuple[str, ...], Path | None]:
    """The registry, the model refs and the qualification cache that `--model` (a registry)
    or `--model-dir` (one exported version, read-only) describe."""
    if args.model_dir is None:
        if not args.model:
            raise UsageError("serve needs --model NAME[@REF] (or --model-dir DIR)")
        if args.name is not None:
            raise UsageError("--name names the model of --model-dir; with --model use NAME@REF")
        return args.registry or default_registry(), tuple(args.model), None
    from slimserve.registry.errors import RegistryError
    from slimserve.registry.store import MANIFEST, Registry, validate_name

    if args.model or args.registry:
        raise UsageError("--model-dir serves one version directory: leave out --model/--registry")
    if args.draft not in (None, "none", "ngram"):
        raise UsageError("--model-dir holds one model: a draft model needs --model and a registry")
    directory = args.model_dir.resolve()
    if not (directory / MANIFEST).is_file():
        raise UsageError(
            f"--model-dir {args.model_dir}: no {MANIFEST} there, so it is not a version "
            "directory (`slimserve registry export NAME@REF DIR` writes one)"
        )
    try:
        own = Registry(directory).names()[0]
        name = validate_name(args.name) if args.name else own
    except RegistryError as exc:
        raise UsageError(f"--model-dir {args.model_dir}: {exc}") from None
    # Verdicts are kept beside the home's registry: the directory itself is never written.
    return directory, (name,), home() / "qualify" / "verdicts.json"


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    config = serve_config(args)
    if args.ray:  # the same models and flags, as a Ray Serve application
        from slimserve.cli.scale import serve_on_ray

        return serve_on_ray(args, config)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    from slimserve.server.app import BindError, serve

    try:
        return int(asyncio.run(serve(config)))
    except BindError as exc:  # a port in use: one line and exit 2, as for a bad flag
        raise UsageError(str(exc)) from None


def add_parser(sub: Any) -> None:
    """Add `serve` to the top-level subparsers."""
    from slimserve.engine.spec_policy import DRAFT_POLICIES

    p = sub.add_parser("serve", help="serve registry models over gRPC")
    p.add_argument("--model", action="append", help="NAME[@VERSION|@ALIAS] from the registry")
    p.add_argument(
        "--model-dir",
        type=Path,
        help="serve one version directory (manifest and files, as `registry export` writes it; "
        "a storage initializer's /mnt/models), read-only, every checksum verified",
    )
    p.add_argument("--name", help="with --model-dir: the name it serves as (default: its own)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    backend_args(
        p,
        "auto: llama.cpp on CPU when installed, else the torch Llama fast path, else eager",
        "llama.cpp weight format; auto keeps the artifact's precision (int8 -> q8_0)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=50051)
    p.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch threads (0 = default)"
    )
    p.add_argument(
        "--decode-threads",
        type=non_negative_int,
        default=0,
        help="llama.cpp: threads of a single sequence's decode step; larger passes use all "
        "--threads (0 = what qualification measured fastest here; `slimserve models` shows it)",
    )
    p.add_argument(
        "--no-ggml-threadpool",
        action="store_true",
        help="llama.cpp: a threadpool per call (llama.cpp's default, whose workers spin "
        "between calls) instead of persistent pools that sleep between passes",
    )
    p.add_argument("--max-batch", type=positive_int, default=16, help="concurrent sequences")
    p.add_argument(
        "--max-seq-len",
        type=non_negative_int,
        default=0,
        help="context per sequence (0 = fit the budget)",
    )
    p.add_argument(
        "--kv-cache-mb",
        type=non_negative_int,
        default=0,
        help="KV-cache budget per model, MiB (0 = auto: contexts as for 1024, llama.cpp's "
        "shared pool at most 256)",
    )
    kv_layout_arg(
        p,
        "llama.cpp's KV cache: one pool every stream draws on (unified), or max-seq-len "
        "held per stream (split: a step reads only each stream's cells; the engine keeps "
        "the running slots consecutive); auto: split when that fits --kv-cache-mb",
    )
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests at most")
    p.add_argument(
        "--score-step-tokens",
        type=positive_int,
        default=2048,
        help="tokens of Score work between two decode steps (how long a Score holds streams)",
    )
    p.add_argument(
        "--max-score-tokens",
        type=positive_int,
        default=65536,
        help="tokens one Score call may put through the model (prompt + label - 1, summed)",
    )
    p.add_argument(
        "--max-step-ms",
        type=positive_float,
        default=100.0,
        help="how long an engine step should take while streams decode: prompt chunks and "
        "Score work are sized from measured speed to fit beside the decode tokens, which "
        "bounds a stream's largest gap between two tokens",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="prefill every prompt whole, never starting from the KV an earlier request "
        "with the same beginning left behind",
    )
    p.add_argument(
        "--draft",
        metavar="ngram|NAME@REF",
        help="speculative decoding: 'ngram' (prompt lookup, no model) or a draft model from "
        "the registry sharing the tokenizer (e.g. made by recipes/draft.toml); same output",
    )
    p.add_argument(
        "--draft-tokens",
        type=positive_int,
        default=4,
        help="most tokens drafted per sequence and step (--draft)",
    )
    p.add_argument(
        "--draft-policy",
        choices=DRAFT_POLICIES,
        default=DRAFT_POLICIES[0],
        help="adaptive: verify as many drafts as pay, from this machine's measured pass costs "
        "and the measured acceptance (none when none do); always: all of --draft-tokens",
    )
    p.add_argument("--grace", type=non_negative_float, default=10.0, help="shutdown grace seconds")
    p.add_argument("--metrics-port", type=port, help="Prometheus /metrics port (default: off)")
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address /metrics listens on (default: 127.0.0.1, loopback only; it names the "
        "models and their load)",
    )
    p.add_argument(
        "--metrics-token-file",
        type=Path,
        help="a file holding the bearer token Prometheus must send to /metrics "
        f"(default: ${ENV_METRICS_TOKEN}; none: no token asked)",
    )
    p.add_argument(
        "--engine-step-timeout",
        type=non_negative_float,
        default=300.0,
        help="seconds one engine step may run before the engine process is killed and "
        "restarted (a hang in native code; 0 = no watchdog; default: 300)",
    )
    p.add_argument(
        "--crash-verdict-ttl",
        type=positive_float,
        default=86400.0,
        help="seconds a plan that kept crashing (SIGSEGV, SIGABRT, a hung step; never "
        "SIGKILL/SIGTERM) stays barred on this machine before it is qualified again "
        "(default: 86400)",
    )
    p.add_argument(
        "--http-port",
        type=port,
        help="OpenAI-compatible HTTP port, /v1/completions and /v1/chat/completions "
        "(0 = any free port; default: off; docs/openai.md)",
    )
    _add_limits(p)
    _add_connections(p)
    _add_http(p)
    _add_security(p)
    registry_arg(p)
    from slimserve.cli.scale import add_serve_flags

    add_serve_flags(p)
    p.set_defaults(func=cmd_serve)


def _add_limits(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits (each exceeded one is INVALID_ARGUMENT naming it)")
    g.add_argument("--max-new-tokens-limit", type=positive_int, default=2048)
    g.add_argument("--default-max-new-tokens", type=positive_int, default=128)
    g.add_argument("--max-prompt-tokens", type=positive_int, default=4096)
    g.add_argument("--max-stop-sequences", type=non_negative_int, default=16)
    g.add_argument("--max-stop-sequence-chars", type=positive_int, default=256)
    g.add_argument("--max-top-n", type=non_negative_int, default=20)
    g.add_argument("--max-labels", type=positive_int, default=32)
    g.add_argument(
        "--max-n", type=positive_int, default=16, help="completions one request may ask for"
    )
    g.add_argument("--max-message-bytes", type=positive_int, default=4 * 1024 * 1024)


def _add_connections(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connections (per client connection)")
    g.add_argument(
        "--max-concurrent-streams",
        type=positive_int,
        default=128,
        help="calls open at once on one connection; more wait for one to end (default: 128)",
    )
    g.add_argument(
        "--max-connection-age",
        type=non_negative_float,
        default=0.0,
        help="seconds before a client is asked to reconnect, +-10%% (default: 0 = never)",
    )
    g.add_argument(
        "--max-connection-age-grace",
        type=non_negative_float,
        default=30.0,
        help="seconds calls may still run after --max-connection-age (default: 30)",
    )
    g.add_argument(
        "--keepalive-time",
        type=positive_float,
        default=60.0,
        help="seconds between the server's keepalive pings (default: 60)",
    )
    g.add_argument(
        "--keepalive-timeout",
        type=positive_float,
        default=20.0,
        help="seconds to wait for a ping's answer before closing (default: 20)",
    )
    g.add_argument(
        "--min-client-ping-interval",
        type=non_negative_float,
        default=10.0,
        help="shortest interval between a client's pings allowed; faster ones get GOAWAY "
        "(default: 10)",
    )


def _add_http(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP door transport (--http-port; docs/openai.md)")
    g.add_argument(
        "--http-allowed-hosts",
        metavar="NAMES",
        help="comma-separated Host names the HTTP door answers besides loopback names and IP "
        "addresses (exact or *.suffix; * = any); others get 400 (DNS rebinding)",
    )
    g.add_argument(
        "--http-cors-origins",
        metavar="ORIGINS",
        help="comma-separated origins (https://app.example) whose pages may call the HTTP "
        "door; default: CORS off",
    )
    g.add_argument(
        "--http-header-timeout",
        type=positive_float,
        default=10.0,
        help="seconds a request's headers may take to arrive; then 408 (default: 10)",
    )
    g.add_argument(
        "--http-body-timeout",
        type=positive_float,
        default=60.0,
        help="seconds a request's body may take to arrive; then 408 (default: 60)",
    )
    g.add_argument(
        "--http-idle-timeout",
        type=positive_float,
        default=5.0,
        help="seconds an idle kept-alive connection stays open (default: 5)",
    )
    g.add_argument(
        "--http-max-connections",
        type=positive_int,
        default=512,
        help="open HTTP connections at most; more are answered 503 (default: 512)",
    )


def _add_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (token files: docs/deploy.md)")
    g.add_argument(
        "--auth-token-file",
        type=Path,
        help="bearer tokens for generation, one per line as TOKEN, LABEL:TOKEN or "
        f"LABEL TOKEN (default: ${ENV_AUTH_TOKEN})",
    )
    g.add_argument(
        "--admin-token-file",
        type=Path,
        help=f"bearer tokens for LoadModel/UnloadModel (default: ${ENV_ADMIN_TOKEN})",
    )
    g.add_argument(
        "--allow-model-control",
        action="store_true",
        help="with no admin token, let every caller load and unload models (development)",
    )
    g.add_argument(
        "--allow-insecure-tokens",
        action="store_true",
        help="accept tokens on a non-loopback --host without TLS (they travel in plaintext)",
    )
    g.add_argument("--tls-cert", type=Path, help="PEM server certificate chain")
    g.add_argument("--tls-key", type=Path, help="PEM server private key")
    g.add_argument("--tls-client-ca", type=Path, help="PEM CA for client certificates (mTLS)")
