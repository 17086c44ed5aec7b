"""`slimserve fraud ...`: simulate, train, score and report, wired into the main parser.

``slimserve.cli.build_parser`` calls ``add_fraud_commands``; flags are read here and turned
into one config per command. Each handler imports what it needs when it runs, so building
the parser imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimserve.clients import Client

AddArgs = Callable[[argparse.ArgumentParser], None]


def add_fraud_commands(
    subparsers: Any,  # argparse's private _SubParsersAction
    registry_arg: AddArgs,
    target_arg: AddArgs,
) -> None:
    """Add ``fraud simulate|train|score|report`` to ``subparsers``.

    ``registry_arg`` adds ``--registry``; ``target_arg`` adds ``--target``, ``--token-file``,
    ``--timeout`` and ``--tls-ca/--tls-cert/--tls-key`` (the main CLI's own helpers, so the
    flags read the same everywhere, and clients are built by ``slimserve.cli.common.client``).
    """
    fraud = subparsers.add_parser(
        "fraud", help="the fraud-scoring example: simulate, train, score, report"
    )
    sub = fraud.add_subparsers(dest="fraud_command", required=True)
    _add_simulate(sub)
    _add_train(sub, registry_arg)
    _add_score(sub, target_arg)
    _add_report(sub, target_arg)


def _add_simulate(sub: Any) -> None:
    p = sub.add_parser("simulate", help="write simulated, labelled card payments")
    p.add_argument("--out", type=Path, required=True, help="output file, .csv or .jsonl")
    p.add_argument("--customers", type=int, default=2000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_simulate)


def _add_train(sub: Any, registry_arg: AddArgs) -> None:
    # The defaults keep SmolLM2-135M's fine-tune affordable on a few CPU cores: only the top 8
    # of its 30 blocks train, and only on the yes/no choice (the probability Score returns).
    p = sub.add_parser("train", help="fine-tune the base model on labelled payments, publish")
    p.add_argument("--data", type=Path, required=True, help="labelled training file")
    p.add_argument("--from", dest="base", default="smollm2-135m-instruct", help="base NAME[@REF]")
    p.add_argument("--name", default="fraud-scorer", help="registry name to publish as")
    p.add_argument("--alias", help="also point this alias at the new version")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument(
        "--train-layers",
        type=int,
        default=8,
        help="train only the last N transformer blocks (0 = all)",
    )
    p.add_argument("--loss", choices=["labels", "vocab"], default="labels")
    p.add_argument("--balance", choices=["oversample", "weight", "none"], default="oversample")
    p.add_argument("--max-minutes", type=float, default=0.0, help="0 = no limit")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--log-every", type=int, default=5, help="steps per log line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0 = torch's default); on a busy shared machine 1 can be several "
        "times faster than spinning threads that wait for each other",
    )
    p.add_argument("--holdout", type=float, default=0.2, help="last share held out for eval")
    p.add_argument("--eval-data", type=Path, help="evaluate on this file instead")
    p.add_argument("--legit-per-fraud", type=float, default=4.0)
    p.add_argument("--eval-frauds", type=int, default=150, help="frauds in the eval sample")
    p.add_argument("--eval-legit", type=int, default=350, help="legit rows in the eval sample")
    registry_arg(p)
    p.set_defaults(func=cmd_train)


def _add_score(sub: Any, target_arg: AddArgs) -> None:
    p = sub.add_parser("score", help="score a file of payments through a server")
    p.add_argument("file", type=Path, help=".csv or .jsonl payments (labels optional)")
    p.add_argument("--model", default="fraud-scorer@production", help="NAME[@VERSION|@ALIAS]")
    p.add_argument(
        "--out",
        type=Path,
        help="output file: .jsonl or .ndjson for JSON lines, else CSV (default: CSV on stdout)",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="score at which to flag")
    p.add_argument(
        "--explain",
        action="store_true",
        help="a JSON verdict (risk level, reasons) per flagged row, held to a schema",
    )
    p.add_argument("--explain-tokens", type=int, default=64)
    p.add_argument(
        "--explain-max", type=int, default=0, help="explain at most this many rows (0: all)"
    )
    p.add_argument("--concurrency", type=int, default=4, help="Score calls in flight")
    target_arg(p)
    p.set_defaults(func=cmd_score)


def _add_report(sub: Any, target_arg: AddArgs) -> None:
    p = sub.add_parser("report", help="compare model versions and the baseline on labels")
    p.add_argument("file", type=Path, help="labelled .csv or .jsonl payments")
    p.add_argument("--models", nargs="*", default=[], help="NAME@REF ... to compare")
    p.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="NAME@REF=HOST:PORT",
        help="score this model on that server (one server holds one version per name)",
    )
    p.add_argument("--baseline-train", type=Path, help="labelled file to train the baseline on")
    p.add_argument("--out", type=Path, default=Path("fraud-report"), help="output directory")
    p.add_argument("--limit", type=int, default=0, help="score a seeded sample of N rows")
    p.add_argument(
        "--frauds",
        type=int,
        default=0,
        help="with --limit: a class-stratified sample of up to N frauds (the rest legit, "
        "reweighted to the file's fraud rate) instead of a uniform one",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=100, help="precision among the top k scores")
    p.add_argument("--concurrency", type=int, default=16, help="for the throughput run")
    p.add_argument("--throughput-rows", type=int, default=256)
    target_arg(p)
    p.set_defaults(func=cmd_report)


def cmd_simulate(args: argparse.Namespace) -> int:
    from slimserve.fraud.simulate import write_simulation

    count = write_simulation(args.out, args.customers, args.days, args.seed)
    print(f"wrote {count} payments to {args.out}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from slimserve.cli.common import default_registry
    from slimserve.compression.finetune import FinetuneConfig
    from slimserve.compression.progress import ProgressEvent
    from slimserve.fraud.train import TrainConfig, train_fraud_scorer

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    finetune = FinetuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        train_layers=args.train_layers,
        loss=args.loss,
        balance=args.balance,
        max_minutes=args.max_minutes or None,  # the flag's 0 is "no limit"
        max_seq_len=args.max_seq_len,
        log_every=args.log_every,
        seed=args.seed,
    )
    config = TrainConfig(
        data=args.data,
        registry=args.registry or default_registry(),
        finetune=finetune,
        base=args.base,
        name=args.name,
        alias=args.alias,
        holdout=args.holdout,
        eval_data=args.eval_data,
        legit_per_fraud=args.legit_per_fraud,
        eval_frauds=args.eval_frauds,
        eval_legit=args.eval_legit,
        seed=args.seed,
    )

    def progress(p: ProgressEvent) -> None:
        if not p.done or "loss" not in p.metrics:
            return  # the stage's start and end: no training step to report
        per_step = p.elapsed_s / p.done
        eta = per_step * (p.total - p.done)
        _err(
            f"step {p.done}/{p.total}  loss {p.metrics['loss']:.4f}  "
            f"lr {p.metrics.get('lr', float('nan')):.2e}  "
            f"{per_step:.1f} s/step  eta {eta / 60:.1f} min"
        )

    result = train_fraud_scorer(config, progress=progress, say=_err)
    m = result.metrics
    print(
        f"published {result.ref} ({result.digest[:12]}): held-out ROC-AUC {m['roc_auc']:.4f} "
        f"PR-AUC {m['pr_auc']:.4f} on {m['eval_rows']:.0f} rows ({m['eval_frauds']:.0f} frauds); "
        f"baseline ROC-AUC {m['baseline_roc_auc']:.4f} PR-AUC {m['baseline_pr_auc']:.4f} "
        f"(whole held-out set: {m['baseline_roc_auc_all']:.4f} / {m['baseline_pr_auc_all']:.4f})"
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from slimserve.fraud.audit import output_format
    from slimserve.fraud.scorer import ScoreOptions, score_file

    options = ScoreOptions(
        model=args.model,
        threshold=args.threshold,
        concurrency=args.concurrency,
        explain=args.explain,
        explain_tokens=args.explain_tokens,
        explain_max=args.explain_max,
    )
    with _client(args, args.target) as client:
        if args.out is None:
            summary = score_file(
                args.file, client, options, out=sys.stdout, log=sys.stderr, explain_to=sys.stderr
            )
        else:
            with args.out.open("w", encoding="utf-8", newline="") as out:
                summary = score_file(
                    args.file,
                    client,
                    options,
                    out=out,
                    log=sys.stderr,
                    explain_to=sys.stdout,
                    fmt=output_format(args.out),
                )
    _err(summary.describe())
    return 1 if summary.rejected or summary.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from slimserve.fraud.report import ReportConfig, run_report

    routes = dict(_parse_route(r) for r in args.route)
    config = ReportConfig(
        data=args.file,
        models=tuple(args.models),
        target=args.target,
        routes=routes,
        baseline_train=args.baseline_train,
        out=args.out,
        limit=args.limit,
        frauds=args.frauds,
        seed=args.seed,
        k=args.k,
        concurrency=args.concurrency,
        throughput_rows=args.throughput_rows,
    )
    report = run_report(config, lambda target: _client(args, target), progress=_err)
    print(report.table)
    _err(f"wrote {report.markdown} and {report.png}")
    return 0


def _parse_route(text: str) -> tuple[str, str]:
    model, sep, target = text.partition("=")
    if not sep or not model or not target:
        raise SystemExit(f"--route {text!r}: use NAME@REF=HOST:PORT")
    return model, target


def _client(args: argparse.Namespace, target: str) -> Client:
    """The main CLI's client (token file, timeout, TLS flags) for `target`: a report reaches
    each routed model's own server."""
    from slimserve.cli.common import client

    made: Client = client(argparse.Namespace(**{**vars(args), "target": target}))
    return made


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
