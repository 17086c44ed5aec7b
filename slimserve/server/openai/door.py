"""The HTTP door's server: uvicorn on the gRPC server's own asyncio loop.

`HttpDoor.start` binds the socket itself (so port 0 works and the bound port is known at
once, and a taken port is an OSError rather than uvicorn's `sys.exit`), then runs
uvicorn's `serve` as a task on the running loop. The application owns SIGTERM/SIGINT
(`server.app.serve` drains both doors), so uvicorn installs no signal handlers. The
transport limits (`HttpTransport`: header deadline, connection cap, idle keep-alive) are
uvicorn's protocol as `guard.guarded_protocol` extends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from slimserve.server.config import HttpTransport, TlsConfig
from slimserve.server.openai.guard import Refused, guarded_protocol

log = logging.getLogger(__name__)

#: How long `start` waits for uvicorn to begin listening on the bound socket.
STARTUP_S = 10.0


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are the application's: it stops this server when it drains


class HttpDoor:
    """One uvicorn server for `app` on `host:port` (0 = any free port), TLS as gRPC's."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        tls: TlsConfig | None,
        *,
        transport: HttpTransport | None = None,
        on_refused: Refused | None = None,
    ) -> None:
        transport = transport or HttpTransport()
        self.host = host
        self.port = port
        tls_options = {}
        if tls is not None:
            tls_options = {
                "ssl_certfile": str(tls.cert),
                "ssl_keyfile": str(tls.key),
                "ssl_ca_certs": str(tls.client_ca) if tls.client_ca else None,
                "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE,
            }
        self.config = uvicorn.Config(
            app,
            loop="none",
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,  # the door writes its own, with the principal
            server_header=False,
            http=guarded_protocol(transport, on_refused or (lambda _route, _status: None)),
            timeout_keep_alive=max(1, math.ceil(transport.idle_timeout_s)),
            # Requests in progress at most (pipelined ones count): one over the connection
            # cap, which the protocol enforces as connections arrive.
            limit_concurrency=transport.max_connections + 1,
            **tls_options,  # type: ignore[arg-type]
        )
        self.server = _Uvicorn(self.config)
        self._task: asyncio.Task[None] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.config.is_ssl else "http"

    async def start(self) -> int:
        """Bind, start serving on the running loop, and return the bound port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # Said to be TCP (`socket.create_server` leaves the protocol number 0): asyncio sets
        # TCP_NODELAY only on such sockets' connections, and without it a kept-alive
        # response body waited ~40 ms behind its headers for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host.strip("[]"), self.port))
            sock.listen()
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_S
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP door on {self.host}:{self.port} stopped at start")
            if loop.time() > deadline:
                raise OSError(f"the HTTP door on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP on %s://%s:%d/v1", self.scheme, self.host, self.port)
        return self.port

    async def stop(self, timeout: float) -> None:
        """Stop listening, let open responses finish for up to `timeout` s, then cut them."""
        if self._task is None:
            return
        self.server.config.timeout_graceful_shutdown = max(round(timeout), 1)
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout + 1.0)
        except TimeoutError:
            self.server.force_exit = True
            await self._task
        self._task = None
