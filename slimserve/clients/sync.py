"""`Client`: the blocking client over a `grpc` channel.

Calls are built by `BaseClient`; this module only sends them and sleeps between retries.
Imports grpc and the client's own modules only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
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


class Client(BaseClient):
    """Blocking client. Use as a context manager or call `close()`. Arguments as
    `BaseClient`'s: `Client("host:50051", timeout=60, retries=3, token=..., credentials=...)`.

    Raises:
        InsecureToken: a token would be sent in clear text to another host.
    """

    def _open_channel(self, address: str, options: list[tuple[str, Any]], credentials: Any) -> Any:
        if credentials is None:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, credentials, options=options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _send(self, call: Unary[T]) -> T:
        method = call.rpc(self._stubs)
        t0 = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                response = method(call.request, timeout=call.timeout, metadata=call.metadata)
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    raise exc from None
                time.sleep(delay)
                continue
            return call.read(response, (time.perf_counter() - t0) * 1e3)
        raise AssertionError("unreachable")

    def generate(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> Generation:
        """Complete `prompt` (text or chat messages); options as `generate_request`."""
        return self._send(self._build_generate(prompt, timeout, request_id, options))

    def stream(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> Iterator[StreamChunk]:
        """Yield chunks as tokens are produced; closing the iterator cancels the call."""
        spec = self._build_stream(prompt, timeout, request_id, options)
        for attempt in range(self.retries + 1):
            call = self._stubs.generation.GenerateStream(
                spec.request, timeout=spec.timeout, metadata=spec.metadata
            )
            started = False
            try:
                for msg in call:
                    started = True
                    yield to_chunk(msg)
                return
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                delay = None if started else self._retry_delay(exc, attempt)
                if delay is None:
                    raise exc from None
                time.sleep(delay)
            finally:
                call.cancel()

    def score(
        self,
        prompt: Prompt,
        labels: Sequence[str],
        *,
        model: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ScoreResult:
        """Probabilities of `labels` as continuations of `prompt`, in one forward pass;
        `latency_ms` is the client's round trip, retries included."""
        return self._send(self._build_score(prompt, labels, model, timeout, request_id))

    def tokenize(self, prompt: Prompt, *, model: str = "") -> list[int]:
        """The token ids the model reads for `prompt` (a chat after its template)."""
        return self._send(self._build_tokenize(prompt, model))

    def models(self) -> list[ModelInfo]:
        """Every model the server holds."""
        return self._send(self._build_models())

    def model_info(self, model: str = "") -> ModelInfo:
        """The served version of `model` (`NAME[@REF]`; "" = the default model)."""
        return self._send(self._build_model_info(model))

    def load_model(
        self, model: str, *, make_default: bool = False, beside: bool = False
    ) -> ModelInfo:
        """Load `NAME@REF` (an admin call); waits up to 10 minutes. `beside` keeps the
        name's other loaded versions serving (each by `NAME@VERSION`)."""
        return self._send(self._build_load_model(model, make_default, beside))

    def unload_model(self, model: str) -> None:
        """Unload every version of `NAME`, or the one `NAME@REF` names (an admin call)."""
        self._send(self._build_unload_model(model))

    def health(self, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING', ... for the server or one service."""
        return self._send(self._build_health(service))

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the server reports SERVING.

        Raises:
            Unavailable: it did not within `timeout` seconds.
        """
        deadline = ready_deadline(timeout)
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except ClientError:
                pass
            if time.monotonic() > deadline:
                raise not_ready(timeout)
            time.sleep(WAIT_READY_POLL_S)
