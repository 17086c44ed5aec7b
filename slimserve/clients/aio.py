"""`AsyncClient`: the asyncio client over a `grpc.aio` channel.

Calls are built by `BaseClient`; this module only awaits them and sleeps between retries,
so it offers what `Client` offers, with the same retry policy. Imports grpc and the
client's own modules only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from slimserve.clients._base import (
    WAIT_READY_POLL_S,
    BaseClient,
    T,
    Unary,
    not_ready,
    ready_deadline,
)
from slimserve.clients._convert import Prompt, to_chunk
from slimserve.clients.errors import ClientError, from_rpc_error
from slimserve.clients.types import Generation, ModelInfo, ScoreResult, StreamChunk


class AsyncClient(BaseClient):
    """asyncio client over `grpc.aio`. Use `async with` or `await close()`.

    Arguments and retries as `BaseClient`'s, like `Client`.

    Raises:
        InsecureToken: a token would be sent in clear text to another host.
    """

    def _open_channel(self, address: str, options: list[tuple[str, Any]], credentials: Any) -> Any:
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, credentials, options=options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _send(self, call: Unary[T]) -> T:
        method = call.rpc(self._stubs)
        t0 = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                response = await method(call.request, timeout=call.timeout, metadata=call.metadata)
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    raise exc from None
                await asyncio.sleep(delay)
                continue
            return call.read(response, (time.perf_counter() - t0) * 1e3)
        raise AssertionError("unreachable")

    async def generate(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> Generation:
        """Complete `prompt`; as `Client.generate`."""
        return await self._send(self._build_generate(prompt, timeout, request_id, options))

    async def stream(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> AsyncIterator[StreamChunk]:
        """Async-iterate chunks; leaving the loop early cancels the call. A stream that found
        the server UNAVAILABLE is retried only before its first message."""
        spec = self._build_stream(prompt, timeout, request_id, options)
        for attempt in range(self.retries + 1):
            call = self._stubs.generation.GenerateStream(
                spec.request, timeout=spec.timeout, metadata=spec.metadata
            )
            started = False
            try:
                async for msg in call:
                    started = True
                    yield to_chunk(msg)
                return
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                delay = None if started else self._retry_delay(exc, attempt)
                if delay is None:
                    raise exc from None
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def score(
        self,
        prompt: Prompt,
        labels: Sequence[str],
        *,
        model: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ScoreResult:
        """Probabilities of `labels` after `prompt`; as `Client.score`."""
        return await self._send(self._build_score(prompt, labels, model, timeout, request_id))

    async def tokenize(self, prompt: Prompt, *, model: str = "") -> list[int]:
        """As `Client.tokenize`."""
        return await self._send(self._build_tokenize(prompt, model))

    async def models(self) -> list[ModelInfo]:
        """Every model the server holds."""
        return await self._send(self._build_models())

    async def model_info(self, model: str = "") -> ModelInfo:
        """As `Client.model_info`."""
        return await self._send(self._build_model_info(model))

    async def load_model(
        self, model: str, *, make_default: bool = False, beside: bool = False
    ) -> ModelInfo:
        """As `Client.load_model`."""
        return await self._send(self._build_load_model(model, make_default, beside))

    async def unload_model(self, model: str) -> None:
        """As `Client.unload_model`."""
        await self._send(self._build_unload_model(model))

    async def health(self, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING', ... for the server or one service."""
        return await self._send(self._build_health(service))

    async def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait until the server reports SERVING.

        Raises:
            Unavailable: it did not within `timeout` seconds.
        """
        deadline = ready_deadline(timeout)
        while True:
            try:
                if await self.health() == "SERVING":
                    return
            except ClientError:
                pass
            if time.monotonic() > deadline:
                raise not_ready(timeout)
            await asyncio.sleep(WAIT_READY_POLL_S)
