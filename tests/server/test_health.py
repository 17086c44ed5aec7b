"""The health service under a watcher that never reads."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2

from slimserve.server.app import DrainingHealth


class _StuckPeer:
    """A Watch caller that never reads: every write waits forever (a full transport)."""

    def __init__(self) -> None:
        self.writes = 0

    async def write(self, message: Any) -> None:
        self.writes += 1
        await asyncio.Event().wait()


def test_a_watcher_that_never_reads_blocks_neither_set_nor_the_drain() -> None:
    async def run() -> None:
        health = DrainingHealth()
        peer = _StuckPeer()
        request = health_pb2.HealthCheckRequest(service="")
        watch = asyncio.create_task(health.Watch(request, peer))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert peer.writes == 1  # stuck in its first write
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.wait_for(health.set("", not_serving), 2)
        await asyncio.wait_for(health.set("tiny", not_serving), 2)
        await asyncio.wait_for(health.enter_graceful_shutdown(), 2)
        watch.cancel()

    asyncio.run(run())
