"""`slimserve qualify`: the cached qualification verdicts of a registry, shown or cleared.

`serve` qualifies each plan once per machine, artifact and shape and keeps the verdicts in
`<registry>/.qualify/verdicts.json` (`slimserve.engine.qualify`). `--clear` forgets them
(all, or one model version's with `--model`), so the next `serve` qualifies again: after
a library or driver change the fingerprint does not see, or to lift a crash-loop verdict
before it expires.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from slimserve.cli.common import open_registry, registry_arg


def cmd_qualify(args: argparse.Namespace) -> int:
    from slimserve.engine.qualify import Verdict, VerdictCache, verdicts_path
    from slimserve.registry.store import parse_model_ref

    registry = open_registry(args)
    digest = None
    if args.model:
        name, ref = parse_model_ref(args.model)
        digest = registry.get(name, ref).digest
    cache = VerdictCache(verdicts_path(registry.root))
    if args.clear:
        gone = cache.clear(digest)
        what = args.model or "every model"
        print(f"cleared {gone} cached survey(s) and verdict(s) of {what}; the next serve "
              "qualifies them again")  # fmt: skip
        return 0
    rows = [
        (key, Verdict(**raw))
        for key, raw in sorted(cache.read()["verdicts"].items())
        if digest is None or key.split("/")[1] == digest[:16]
    ]
    if not rows:
        print(f"no cached verdicts in {cache.path}")
    now = time.time()
    for key, verdict in rows:
        print(f"{key}: {verdict.summary()}{_expiry(verdict, now)}")
    return 0


def _expiry(verdict: Any, now: float) -> str:
    if verdict.expires_at is None:
        return ""
    left = verdict.expires_at - now
    return " (expired)" if left <= 0 else f" (expires in {left / 3600:.1f} h)"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "qualify", help="show or clear the cached qualification verdicts (plans per machine)"
    )
    p.add_argument("--clear", action="store_true", help="forget them: the next serve requalifies")
    p.add_argument("--model", default="", help="only this NAME[@VERSION|@ALIAS]")
    registry_arg(p)
    p.set_defaults(func=cmd_qualify)
