"""A Ray Serve application: slimserve's OpenAI routes in every replica.

Each replica (`OpenAIReplica`, a Ray actor) loads the configured models as `slimserve serve`
does, each model's engine in a supervised process of its own, and serves the routes of
`slimserve.server.openai.OpenAIApp` (the server's own door: the same validation, limits,
errors, streaming and access log) as its ASGI app behind Serve's HTTP proxy. Serve adds
what one machine lacks: replicas on every node, a router that sends each request to a
replica with room (`max_ongoing_requests`), a queue bound (`max_queued_requests`, 503
beyond it), autoscaling on ongoing requests, and the restart of a replica that dies.

Replica health: an engine that crashes is restarted by its own supervisor within seconds
(requests meanwhile get 503, which clients retry); only an engine that stays down longer than
`DOWN_S` fails Serve's health check, so Serve replaces the whole replica.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from slimserve.registry.store import parse_model_ref
from slimserve.server.app import model_manager
from slimserve.server.config import ServerConfig
from slimserve.server.generation import Generation
from slimserve.server.interceptors import InFlight
from slimserve.server.metrics import Metrics
from slimserve.server.openai import OpenAIApp

log = logging.getLogger(__name__)

#: Seconds a model's engine may stay down (its supervisor restarting it) before the replica
#: fails Serve's health check and is replaced.
DOWN_S = 60.0


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class OpenAIReplica:
    """One replica: the models of `config`, loaded before it takes traffic (Serve routes to
    a replica only once its constructor returns), and the OpenAI routes over them."""

    def __init__(self, config: ServerConfig) -> None:
        import torch

        # The engine takes its forward threads from torch's (`engine.launch`); a replica
        # reserves `num_cpus`, so it uses that many unless told otherwise.
        torch.set_num_threads(config.threads or max(1, int(torch.get_num_threads())))
        self.models = model_manager(config)
        self.models.loading = True
        for i, text in enumerate(config.models):
            name, ref = parse_model_ref(text)
            self.models.load(name, ref, make_default=i == 0)
        self.models.loading = False
        generation = Generation(self.models, config.limits, Metrics(self.models))
        self.routes = OpenAIApp(generation, config, InFlight(), self.ready)
        self._down_since: float | None = None
        log.info("replica serves %s", ", ".join(m.ref for m in self.models.all()))

    async def ready(self) -> bool:
        """`/health/ready`: every model's engine is up."""
        return all(self.models.serving(m.name) for m in self.models.all())

    def __serve_build_asgi_app__(self) -> Any:
        replica = serve.get_replica_context().replica_id.unique_id
        return _tagged(self.routes.app(), replica)

    def check_health(self) -> None:
        """Serve's health check: fails once a model's engine has been down for `DOWN_S`."""
        down = [m.ref for m in self.models.all() if not self.models.serving(m.name)]
        if not down:
            self._down_since = None
            return
        now = time.monotonic()
        self._down_since = self._down_since or now
        if now - self._down_since > DOWN_S:
            raise RuntimeError(f"engines down for over {DOWN_S:.0f} s: {', '.join(down)}")

    def __del__(self) -> None:
        # Serve calls this on a graceful stop: the engine processes go with the replica.
        models = getattr(self, "models", None)
        if models is not None:
            models.shutdown()


def _tagged(app: Any, replica: str) -> Any:
    """`app`, its every response naming the replica that answered (`x-slimserve-replica`:
    Serve's id for it, the tail of its actor's name), for logs and for tracing a request."""
    header = (b"x-slimserve-replica", replica.encode())

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        async def tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await app(scope, receive, tagged)

    return asgi


@dataclass(frozen=True, slots=True, kw_only=True)
class Scaling:
    """How Serve runs the replicas (docs/scale-out.md).

    `replicas` fixed, or `autoscale` = (min, max) replicas, scaled so each has about
    `target_ongoing` requests; `max_ongoing` requests go to one replica at once (set it to
    the engine's slots plus a little queue: beyond it Serve routes elsewhere or queues);
    `max_queued` requests wait in Serve per caller before it answers 503 (-1: no bound).
    """

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    max_ongoing: int = 24
    target_ongoing: float = 12.0
    max_queued: int = -1
    #: CPUs each replica reserves (its engine's forward threads run there).
    cpus: float = 1.0
    ray_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1]:
            raise ValueError(f"autoscale must be MIN:MAX with 0 <= MIN <= MAX: {self.autoscale}")
        if self.max_ongoing < 1:
            raise ValueError(f"max_ongoing must be >= 1, got {self.max_ongoing}")

    def options(self) -> dict[str, Any]:
        """`Deployment.options` for these settings."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing,
            "max_queued_requests": self.max_queued,
            "ray_actor_options": {"num_cpus": self.cpus, **self.ray_options},
        }
        if self.autoscale is None:
            options["num_replicas"] = self.replicas
        else:
            low, high = self.autoscale
            options["autoscaling_config"] = {
                "min_replicas": low,
                "initial_replicas": max(low, min(self.replicas, high)),
                "max_replicas": high,
                "target_ongoing_requests": self.target_ongoing,
            }
        return options


def application(config: ServerConfig, scaling: Scaling | None = None) -> Any:
    """The Serve application for `config`'s models (`serve.run(application(...))`)."""
    scaling = scaling or Scaling()
    return OpenAIReplica.options(**scaling.options()).bind(config)  # type: ignore[attr-defined]


def run(
    config: ServerConfig,
    scaling: Scaling,
    *,
    name: str = "slimserve",
    http_host: str = "127.0.0.1",
    http_port: int = 8000,
) -> Any:
    """Deploy on the connected Ray cluster (`ray.init` first) with Serve's HTTP proxy on
    `http_host:http_port` (Serve binds it once per cluster), and wait until every replica
    serves. Returns the deployment handle."""
    serve.start(http_options={"host": http_host, "port": http_port})
    return serve.run(application(config, scaling), name=name, route_prefix="/")
