"""`slimserve compress` (run a recipe, publish a version) and `slimserve eval`.

torch, `slimserve.compression` and `slimserve.registry` are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimserve.cli.common import non_negative_int, open_registry, positive_int, registry_arg

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress

    from slimserve.compression.progress import ProgressEvent


def _rich_progress() -> tuple[RichProgress, Callable[[ProgressEvent], None]]:
    """A rich progress display and the `ProgressEvent` callback that draws on it.

    Each stage an event names (``"[1/3] prune (calibrate)"``, ``"[2/3] distill"``) gets one
    task, moved to the event's done of total, its description the event's label (the loss
    when a training stage reports one). The run's closing ``1/1`` for a stage that counted
    its own units completes that task instead of shrinking it to one unit, and leaves the
    last loss shown.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    )
    tasks: dict[str, tuple[TaskID, int]] = {}  # stage -> (task, the units it counts)

    def update(event: ProgressEvent) -> None:
        known = tasks.get(event.stage)
        if known is None:
            task = bar.add_task(event.label, total=event.total, completed=event.done)
            tasks[event.stage] = (task, event.total)
            return
        task, total = known
        if event.done >= event.total:  # finished: keep the units the stage counted
            bar.update(task, completed=total)
            if event.metrics:
                bar.update(task, description=event.label)
            return
        tasks[event.stage] = (task, event.total)
        bar.update(task, completed=event.done, total=event.total, description=event.label)

    return bar, update


def _existing(registry: Any, target: str, parent: Any, recipe: Any) -> Any:
    """The version of `target` this recipe already made from `parent`, or None."""
    for art in registry.artifacts():
        r = art.manifest.recipe
        same = r.get("digest") == recipe.digest and art.manifest.parent == parent.ref
        if art.name == target and same:
            return art
    return None


def cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from slimserve.compression.recipe import CompressJob, compress, load_recipe
    from slimserve.registry.store import parse_model_ref

    recipe = load_recipe(args.recipe, args.set)  # every stage validated before any work
    registry = open_registry(args)
    name, ref = parse_model_ref(args.source)
    parent = registry.get(name, ref)
    target = args.to or name
    if args.skip_existing and (art := _existing(registry, target, parent, recipe)) is not None:
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


def evaluate_ref(args: argparse.Namespace, text: str) -> dict[str, Any]:
    """Every evaluate metric of the version `text` names, against its parent (`eval`):
    perplexity in and out of domain, agreement, size and speed."""
    from slimserve.bench.compare import measure
    from slimserve.compression.evaluate import EvaluateConfig

    cfg = EvaluateConfig(speed_tokens=args.speed_tokens, max_chunks=args.max_chunks)
    return measure(open_registry(args), [text], cfg, text=args.text, device=args.device)[0]


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate_ref(args, args.model)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:22} {v}")
    return 0


def evaluation_args(p: argparse.ArgumentParser) -> None:
    """The flags `evaluate_ref` reads (shared with `bench compare`)."""
    p.add_argument("--text", type=Path, help="held-out text (default: pydoc eval split)")
    p.add_argument("--speed-tokens", type=non_negative_int, default=128, help="0 skips speed")
    p.add_argument("--max-chunks", type=positive_int, default=32)
    p.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch threads (0 = default)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or cuda:N: where versions and parents load (int4 needs cuda)",
    )


def add_parser(sub: Any) -> None:
    """Add `compress` and `eval` to the top-level subparsers."""
    p = sub.add_parser("compress", help="run a recipe and publish a new version")
    p.add_argument("recipe", type=Path, help="recipe TOML (see recipes/)")
    p.add_argument("--from", dest="source", required=True, help="parent NAME[@REF]")
    p.add_argument("--to", help="name to publish under (default: the parent's)")
    p.add_argument("--data", type=Path, help="training text (.txt or .jsonl with 'text')")
    p.add_argument("--eval-text", type=Path, help="held-out text for perplexity")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override a stage field (STAGE: a stage type or 1-based position; VALUE: TOML), "
        "e.g. --set distill.steps=20 --set distill.max_minutes=2; repeatable",
    )
    p.add_argument("--alias", help="point this alias at the new version")
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing if a version made from this parent by this recipe exists",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch threads (0 = default)"
    )
    registry_arg(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="perplexity, size and speed of a version")
    p.add_argument("model", help="NAME[@REF]")
    evaluation_args(p)
    p.add_argument("--json", action="store_true")
    registry_arg(p)
    p.set_defaults(func=cmd_eval)
