"""The gRPC server: services, health, reflection, model loading and graceful shutdown.

Shutdown (SIGTERM): health turns NOT_SERVING (watchers are told), the server stops taking
new calls (they get UNAVAILABLE), calls in flight get `grace_s` to finish, then the engines
stop. The door is closed by the request interceptor, not by gRPC's own `stop(grace)`: gRPC
closes each connection the moment its last call ends, and a client that has not yet read
that call's tail (a loaded machine) then loses it to the reset. So the server refuses new
calls itself, waits for the calls in flight, lets the connections linger a moment so their
last messages are read, and only then stops gRPC. Health watch streams end by themselves
once they have said NOT_SERVING (`DrainingHealth`), so they never hold the stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from slimserve.engine.loader import BackendHook
from slimserve.engine.manager import ModelManager
from slimserve.registry.store import Registry, parse_model_ref
from slimserve.server.config import ServerConfig, TlsConfig
from slimserve.server.generation import Generation
from slimserve.server.interceptors import InFlight, server_interceptors
from slimserve.server.kserve import SERVICE_NAME as KSERVE_SERVICE
from slimserve.server.kserve import InferenceServicer
from slimserve.server.metrics import Metrics
from slimserve.server.servicer import GenerationServicer, ModelServicer
from slimserve.v1 import generation_pb2, models_pb2
from slimserve.v1 import generation_pb2_grpc as gen_grpc
from slimserve.v1 import models_pb2_grpc as models_grpc
from slimserve.v1.inference import grpc_service_pb2_grpc as kserve_grpc

log = logging.getLogger(__name__)

#: After the last call of a drain, how long connections stay open so clients read its tail.
LINGER_S = 0.5

SERVICES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    KSERVE_SERVICE,
)


class DrainingHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """The library's health servicer, but a Watch stream ends (OK) after it has sent NOT_SERVING
    at shutdown. The library's Watch never ends, which would hold a graceful stop for its whole
    grace period; cutting the watches with `stop(0)` instead cuts every other call too,
    including the undelivered tail of a stream that has just finished."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Condition()
        self._closing = False

    async def set(self, service: str, status: int) -> None:
        if self._closing:
            return
        await super().set(service, status)
        async with self._changed:
            self._statuses[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        async with self._changed:
            self._closing = True
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            self._statuses = dict.fromkeys(self._statuses, not_serving)
            self._changed.notify_all()

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every service's status (health v1's List; the library leaves it unimplemented)."""
        response = health_pb2.HealthListResponse()
        for service, status in self._statuses.items():
            response.statuses[service].status = status  # type: ignore[assignment]
        return response

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        last: int | None = None
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        while True:
            # The lock is never held across a write: a watcher that does not read must not
            # block `set()` or the drain.
            async with self._changed:
                while True:
                    status = self._statuses.get(request.service, unknown)
                    if status != last or self._closing:
                        break
                    await self._changed.wait()
                closing = self._closing
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if closing:
                return


_STATUS = {
    True: health_pb2.HealthCheckResponse.SERVING,
    False: health_pb2.HealthCheckResponse.NOT_SERVING,
}


@dataclass
class Server:
    """A running server; `ready` completes once every configured model is warm."""

    config: ServerConfig
    grpc_server: grpc.aio.Server
    port: int
    health: DrainingHealth
    models: ModelManager
    metrics: Metrics
    in_flight: InFlight
    loop: asyncio.AbstractEventLoop
    #: The door-neutral layer every door submits through.
    generation: Generation
    ready: asyncio.Future[None] = field(default_factory=asyncio.Future)
    load_task: asyncio.Task[None] | None = None
    #: Model names that have had a health status (they stay listed, NOT_SERVING, once gone).
    known_models: set[str] = field(default_factory=set)
    #: The OpenAI-compatible HTTP door (`config.http_port`); None when off.
    http: Any = None

    async def refresh_health(self) -> None:
        """Each model's name is SERVING while its engine is up; the server as a whole (""
        and the API services) is SERVING once loading is done and at least one model is."""
        serving_any = False
        for name in sorted(self.known_models | {m.name for m in self.models.all()}):
            self.known_models.add(name)
            up = self.models.serving(name)
            serving_any |= up
            await self.health.set(name, _STATUS[up])
        overall = serving_any and self.ready.done() and self.ready.exception() is None
        for name in ("", *SERVICES):
            await self.health.set(name, _STATUS[overall])

    def health_changed(self) -> None:
        """Called from any thread when a model's state changes."""
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.refresh_health()))

    async def load_configured(self) -> None:
        """Load the configured models off the event loop, then report SERVING."""
        try:
            seen: set[str] = set()
            for i, text in enumerate(self.config.models):
                name, ref = parse_model_ref(text)
                # A name listed again serves that version beside the first one's.
                await asyncio.to_thread(
                    self.models.load, name, ref, make_default=i == 0, beside=name in seen
                )
                seen.add(name)
        except BaseException as exc:
            self.models.loading = False
            log.error("loading models failed: %s", exc)
            self.ready.set_exception(exc)
            return
        self.models.loading = False
        self.ready.set_result(None)
        await self.refresh_health()
        log.info("serving on %s:%d", self.config.host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish, stop engines."""
        grace = self.config.grace_s if grace is None else grace
        t0 = time.monotonic()
        self.in_flight.closing = True
        await self.health.enter_graceful_shutdown()
        if await self.in_flight.wait_idle(grace):
            await asyncio.sleep(min(LINGER_S, grace))
        left = max(0.0, grace - (time.monotonic() - t0))
        if self.http is not None:  # its requests are in `in_flight`: only idle ones are left
            await self.http.stop(left)
            left = max(0.0, grace - (time.monotonic() - t0))
        await self.grpc_server.stop(left)  # cancels whatever is still running after `grace`
        await asyncio.to_thread(self.metrics.close)  # joins the exporter's poll loop
        await asyncio.to_thread(self.models.shutdown)


class BindError(OSError):
    """A port the server was told to listen on cannot be had (in use, not permitted)."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)  # str() is the message alone, without "[Errno N]"
        self.errno = code


def _probe(what: str, host: str, port: int) -> None:
    """Bind `host:port` for a moment, as the listener will, and say why it cannot be had.
    Raises BindError naming `what`, the address and the reason (in use, permission)."""
    if port == 0:
        return
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        socket.create_server((bare, port), family=family).close()
    except OSError as exc:
        raise BindError(exc.errno, _bind_message(what, host, port, exc)) from None


def _bind_message(what: str, host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        why = "the port is in use by another process (pick another port, or stop it)"
    else:
        why = exc.strerror or str(exc)
    return f"cannot listen for {what} on {host}:{port}: {why}"


async def _listen(what: str, host: str, port: int, start: Callable[[], object]) -> None:
    try:
        await asyncio.to_thread(start)
    except OSError as exc:
        raise BindError(exc.errno, _bind_message(what, host, port, exc)) from None


def _bind_grpc(grpc_server: grpc.aio.Server, config: ServerConfig) -> int:
    """Bind the gRPC port; BindError with one clear line when it cannot be had."""
    address = f"{config.host}:{config.port}"
    _probe("gRPC", config.host, config.port)  # the reason, which gRPC's error does not give
    try:
        if config.tls is not None:
            port = grpc_server.add_secure_port(address, _credentials(config.tls))
        else:
            port = grpc_server.add_insecure_port(address)
    except RuntimeError:  # taken between the probe and now
        port = 0
    if port == 0:
        raise BindError(errno.EADDRINUSE, f"cannot listen for gRPC on {address}")
    return int(port)


def _credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    client_ca = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def model_manager(
    config: ServerConfig,
    *,
    backend_hook: BackendHook | None = None,
    on_health: Callable[[str, bool], None] | None = None,
) -> ModelManager:
    """The models a server with `config` holds (none loaded yet): `build_server`'s, and a
    Ray Serve replica's (`slimserve.scale`)."""
    return ModelManager(
        Registry(config.registry),
        config.model,
        retire_grace_s=max(config.grace_s, 60.0),
        backend_hook=backend_hook,
        verdicts=config.qualify_cache,
        on_health=on_health,
    )


async def build_server(
    config: ServerConfig, *, load: bool = True, backend_hook: BackendHook | None = None
) -> tuple[Server, int]:
    """Bind and start; model loading runs in the background (await `server.ready`).

    `backend_hook` wraps each model's backend as it loads (tests inject faults with it).
    Returns the server and the bound port (useful with port 0).
    """
    limits = config.limits
    holder: list[Server] = []
    models = model_manager(
        config,
        backend_hook=backend_hook,
        on_health=lambda _name, _serving: holder[0].health_changed() if holder else None,
    )
    metrics = Metrics(models)
    in_flight = InFlight()
    grpc_server = grpc.aio.server(
        interceptors=server_interceptors(config, metrics, in_flight),
        options=[
            ("grpc.max_receive_message_length", limits.transport_message_bytes),
            ("grpc.max_send_message_length", limits.transport_message_bytes),
            *config.connections.grpc_options(),
            # Off, so that binding a port another process holds fails instead of sharing
            # it: a second server must never take half of the first one's connections.
            ("grpc.so_reuseport", 0),
        ],
    )
    generation = Generation(models, limits, metrics)
    gen_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(generation), grpc_server)
    models_grpc.add_ModelServiceServicer_to_server(ModelServicer(models), grpc_server)
    health_servicer = DrainingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(generation, models, health_servicer), grpc_server
    )
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )
    port = _bind_grpc(grpc_server, config)
    loop = asyncio.get_running_loop()
    server = Server(
        config, grpc_server, port, health_servicer, models, metrics, in_flight, loop, generation
    )
    holder.append(server)
    try:
        if config.metrics_port is not None:
            host, token = config.metrics_host, config.metrics_token
            await _listen(
                "metrics",
                host,
                config.metrics_port,
                lambda: metrics.serve(host, config.metrics_port or 0, token=token),
            )
            log.info("metrics on http://%s:%d/metrics", config.metrics_host, metrics.port)
        for name in ("", *SERVICES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await grpc_server.start()
        if config.http_port is not None:
            server.http = await _start_http(server)
    except BaseException:
        await grpc_server.stop(0)
        await asyncio.to_thread(metrics.close)
        raise
    if load:
        models.loading = True
        server.load_task = asyncio.create_task(server.load_configured())
    return server, port


async def _start_http(server: Server) -> Any:
    """The OpenAI-compatible door on `config.http_port`, ready when gRPC health says so."""
    from slimserve.server.openai import HttpDoor, OpenAIApp  # starlette only when asked

    async def ready() -> bool:
        request = health_pb2.HealthCheckRequest(service="")
        answer = await server.health.Check(request, None)  # "" always has a status
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    from slimserve.server.openai.guard import guard

    config = server.config
    routes = OpenAIApp(server.generation, config, server.in_flight, ready).app()
    # The name the door was bound by is one its clients use (an address passes anyway).
    bound = config.host.strip("[]")
    transport = dataclasses.replace(config.http, allowed_hosts=(*config.http.allowed_hosts, bound))
    guarded = guard(
        routes,
        transport,
        max_body_bytes=config.limits.max_message_bytes,
        on_refused=server.metrics.http,
        routes=tuple(str(getattr(r, "path", "")) for r in routes.routes),
    )
    door = HttpDoor(
        guarded,
        config.host,
        config.http_port or 0,
        config.tls,
        transport=transport,
        on_refused=server.metrics.http,
    )
    try:
        await door.start()
    except OSError as exc:
        message = _bind_message("HTTP", config.host, config.http_port or 0, exc)
        raise BindError(exc.errno, message) from None
    return door


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns the exit code."""
    server, _ = await build_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(server.ready))
    waiter: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({ready, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if ready in done and ready.exception() is not None:
        await server.stop(0)
        return 1
    await waiter
    log.info("shutting down (grace %.1fs)", config.grace_s)
    await server.stop()
    return 0
