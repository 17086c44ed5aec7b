"""`--ray ADDRESS` on `serve` and `fraud score`: the same commands across a Ray cluster.

`serve --ray` deploys the Ray Serve application of `slimserve.scale.serve_app` (the OpenAI
routes, each replica with its own engines) with the `serve` flags' own `ServerConfig`, and
keeps it until SIGTERM/SIGINT; `fraud score --ray` scores on engines in Ray workers
(`slimserve.scale.batch`). Ray is imported only here, inside the handlers.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from slimserve.cli.common import UsageError, non_negative_int, positive_float, positive_int

RAY_HELP = (
    "a Ray cluster to run on: 'auto' (this node's), ray://HOST:10001, or 'local' (start one "
    "here); needs `pip install slimserve[ray]` and a registry every node can read"
)


def _min_max(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or int(low) > int(high):
        raise argparse.ArgumentTypeError(f"{text!r}: use MIN:MAX replicas, e.g. 1:4")
    return int(low), int(high)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve (--ray; docs/scale-out.md)")
    g.add_argument("--ray", metavar="ADDRESS", help=RAY_HELP)
    g.add_argument("--replicas", type=positive_int, default=2, help="replicas (default: 2)")
    g.add_argument(
        "--autoscale",
        type=_min_max,
        metavar="MIN:MAX",
        help="scale between MIN and MAX replicas on ongoing requests instead of --replicas",
    )
    g.add_argument(
        "--max-ongoing-requests",
        type=positive_int,
        help="requests one replica takes at once (default: --max-batch x 1.5)",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=-1,
        help="requests Serve queues per caller before answering 503 (default: -1, no bound)",
    )
    g.add_argument(
        "--replica-cpus", type=positive_float, default=1.0, help="CPUs each replica reserves"
    )


def _connect(address: str) -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'slimserve[ray]'") from None
    if address == "local":
        return ray.init()
    return ray.init(address=address)


def serve_on_ray(args: argparse.Namespace, config: Any) -> int:
    """`serve --ray`: deploy, print where it listens, remove the application on a signal."""
    import dataclasses

    from slimserve.scale.serve_app import Scaling, run

    max_ongoing = args.max_ongoing_requests or config.model.engine.max_batch * 3 // 2
    scaling = Scaling(
        replicas=args.replicas,
        autoscale=args.autoscale,
        max_ongoing=max_ongoing,
        target_ongoing=max(1.0, max_ongoing / 2),  # docs/scale-out.md: half of it
        max_queued=args.max_queued_requests,
        cpus=args.replica_cpus,
    )
    # Workers on other nodes open the registry by this path.
    config = dataclasses.replace(config, registry=Path(config.registry).resolve())
    port = config.http_port or 8000
    _connect(args.ray)
    from ray import serve

    run(config, scaling, http_host=config.host, http_port=port)
    bounds = scaling.autoscale
    count = f"{bounds[0]}-{bounds[1]}" if bounds else str(scaling.replicas)
    print(
        f"serving {', '.join(config.models)} on http://{config.host}:{port}/v1 "
        f"({count} replicas on Ray at {args.ray}); SIGTERM or Ctrl-C removes it",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete("slimserve")
    return 0


def add_score_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("on a Ray cluster (--ray: the model runs in the workers)")
    g.add_argument("--ray", metavar="ADDRESS", help=RAY_HELP)
    g.add_argument("--workers", type=positive_int, default=2, help="engines (default: 2)")
    g.add_argument(
        "--worker-cpus", type=positive_float, default=1.0, help="CPUs each worker reserves"
    )
    g.add_argument(
        "--worker-threads",
        type=non_negative_int,
        default=0,
        help="forward threads of each engine (0 = its CPUs)",
    )
    g.add_argument(
        "--backend", default="auto", choices=["auto", "hf", "llama", "llamacpp"],
        help="each engine's backend (as serve's)",
    )  # fmt: skip
    g.add_argument("--max-batch", type=positive_int, default=16, help="each engine's slots")
    g.add_argument("--registry", type=Path, help="registry every worker reads (as serve's)")


def ray_scorer(args: argparse.Namespace) -> Any:
    """The `RayScorer` `fraud score --ray` scores with (workers started, models loaded)."""
    from slimserve.cli.common import default_registry
    from slimserve.engine.config import ModelConfig
    from slimserve.server.config import ServerConfig

    if args.explain:
        raise UsageError("--explain streams through one server: leave it out with --ray")
    config = ServerConfig(
        registry=Path(args.registry or default_registry()).resolve(),
        models=(args.model,),
        host="127.0.0.1",
        port=0,
        threads=args.worker_threads,
        model=ModelConfig.of(device="cpu", backend=args.backend, max_batch=args.max_batch),
    )
    _connect(args.ray)
    from slimserve.scale.batch import RayScorer

    return RayScorer(config, args.workers, cpus=args.worker_cpus)
