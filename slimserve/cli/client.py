"""`slimserve generate|models|score|health`: calls to a running server.

Imports `slimserve.clients` only (grpc and protobuf), inside the handlers: no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from slimserve.cli.common import (
    client,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    seed,
    target_arg,
)


def cmd_generate(args: argparse.Namespace) -> int:
    from slimserve.clients import ChatMessage, Sampling

    sampling = Sampling(
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p or 0.0,  # 0 = unset: the server uses 1
        seed=args.seed,
    )
    prompt: Any = [ChatMessage("user", args.prompt)] if args.chat else args.prompt
    options = dict(
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        stop=args.stop or (),
    )
    with client(args) as c:
        if args.stream:
            _stream(c, prompt, options)
        else:
            g = c.generate(prompt, **options)
            print(g.text)
            print(
                f"[{g.model} stop={g.stop_reason} tokens={g.generated_tokens} "
                f"total={g.timings.total_ms:.0f}ms]",
                file=sys.stderr,
            )
    return 0


def _stream(c: Any, prompt: Any, options: dict[str, Any]) -> None:
    header = last = None
    for chunk in c.stream(prompt, **options):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.model:
            header = chunk
        last = chunk
    sys.stdout.write("\n")
    if last is not None and header is not None and last.timings is not None:
        t = last.timings
        tps = (last.generated_tokens - 1) / (t.decode_ms / 1e3) if t.decode_ms else 0.0
        print(
            f"[{header.model} stop={last.stop_reason} tokens={last.generated_tokens} "
            f"ttft={t.ttft_ms:.0f}ms decode={tps:.1f} tok/s]",
            file=sys.stderr,
        )


def cmd_models(args: argparse.Namespace) -> int:
    with client(args) as c:
        models = c.models()
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
        where = f"engine pid {m.engine_pid}" if m.engine_pid else "in the server process"
        torch_threads = f" (torch {m.torch_threads})" if m.torch_threads else ""
        threads = f"{m.threads} threads{torch_threads}"
        if "decode_threads" in m.measured:  # llama.cpp's threads by phase, qualified here
            threads += f", single-sequence decode on {m.measured['decode_threads']:.0f}"
        print(f"  serves: {m.kernels or m.backend} [{m.plan}], {threads}, {where}")
        if m.draft:
            print(
                f"  draft: {m.draft}, {m.draft_tokens} tokens a step; accepted "
                f"{m.draft_accepted} of {m.draft_proposed} ({m.draft_acceptance_rate:.0%})"
            )
        if m.measured:
            figures = ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.measured.items()))
            print(f"  measured here: {figures}")
        for plan, why in sorted(m.refused.items()):
            print(f"  not {plan}: {why}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    with client(args) as c:
        r = c.score(args.prompt, args.labels, model=args.model)
    for s in r.scores:
        print(f"{s.label!r}\tp={s.probability:.4f}\tlogprob={s.logprob:.4f}")
    print(f"[{r.model} {r.latency_ms:.1f}ms]", file=sys.stderr)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with client(args) as c:
        if args.wait:
            c.wait_ready(args.wait)
        status = c.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def add_parser(sub: Any) -> None:
    """Add `generate`, `models`, `score` and `health` to the top-level subparsers."""
    p = sub.add_parser("generate", help="complete a prompt through a server")
    p.add_argument("prompt")
    p.add_argument("--model", default="", help="NAME[@VERSION|@ALIAS] (default: server's)")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--chat", action="store_true", help="send as a user chat message")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=probability, default=None, help="in (0, 1]; unset = 1")
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    target_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("models", help="list the models a server holds")
    p.add_argument("--json", action="store_true")
    target_arg(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("score", help="probabilities of labels after a prompt")
    p.add_argument("prompt")
    p.add_argument("labels", nargs="+")
    p.add_argument("--model", default="")
    target_arg(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("health", help="a server's gRPC health status")
    p.add_argument("--service", default="", help="service name ('' = whole server)")
    p.add_argument(
        "--wait", type=non_negative_float, default=0.0, help="wait up to N seconds for SERVING"
    )
    target_arg(p)
    p.set_defaults(func=cmd_health)
