"""Typed gRPC clients: `Client` (blocking) and `AsyncClient` (asyncio).

Results are dataclasses from `slimserve.clients.types`; failures are `ClientError`
subclasses from `slimserve.clients.errors`, never raw `grpc.RpcError`s. Unary calls are
retried on UNAVAILABLE with exponential backoff; streams are retried only before their
first message arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slimserve.clients.errors import ClientError, Unavailable, from_rpc_error
from slimserve.clients.types import (
    ChatMessage,
    Generation,
    LabelScore,
    ModelInfo,
    Sampling,
    ScoreResult,
    StreamChunk,
    Timings,
    TokenLogprob,
)
from slimserve.v1 import generation_pb2 as gen_pb
from slimserve.v1 import generation_pb2_grpc as gen_grpc
from slimserve.v1 import models_pb2 as models_pb
from slimserve.v1 import models_pb2_grpc as models_grpc

Prompt = str | Sequence[ChatMessage]

_MAX_MESSAGE = 64 * 1024 * 1024


def channel_target(target: str | Sequence[str]) -> tuple[str, list[tuple[str, Any]]]:
    """A channel target and options; several addresses are balanced round-robin."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.max_send_message_length", _MAX_MESSAGE),
    ]
    if isinstance(target, str):
        targets = [t.strip() for t in target.split(",") if t.strip()]
    else:
        targets = list(target)
    if len(targets) == 1:
        if targets[0].startswith("dns:"):
            # A DNS name with several A records (a Kubernetes headless Service): spread calls
            # over every replica instead of pinning the first (gRPC's default, pick_first).
            options.append(("grpc.lb_policy_name", "round_robin"))
        return targets[0], options
    options.append(("grpc.lb_policy_name", "round_robin"))
    return "ipv4:" + ",".join(targets), options


def tls_credentials(
    *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: `ca` to trust (None = the system's roots),
    `cert` and `key` to present a client certificate (mutual TLS)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def _model_ref(model: str) -> gen_pb.ModelRef:
    name, _, ref = model.partition("@")
    return gen_pb.ModelRef(name=name, ref=ref)


def _fill_input(msg: Any, prompt: Prompt) -> None:
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.chat.messages.extend(gen_pb.ChatMessage(role=m.role, content=m.content) for m in prompt)
        if not prompt:
            msg.chat.SetInParent()


def generate_request(
    prompt: Prompt,
    *,
    model: str = "",
    max_new_tokens: int = 0,
    sampling: Sampling | None = None,
    stop: Sequence[str] = (),
    time_limit_ms: int = 0,
    ignore_eos: bool = False,
    token_ids: bool = False,
    logprobs: bool = False,
    top_n: int = 0,
) -> gen_pb.GenerateRequest:
    s = sampling or Sampling()
    req = gen_pb.GenerateRequest(
        model=_model_ref(model),
        sampling=gen_pb.SamplingParams(
            do_sample=s.do_sample,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
        ),
        stopping=gen_pb.StoppingCriteria(
            max_new_tokens=max_new_tokens,
            stop_sequences=list(stop),
            time_limit_ms=time_limit_ms,
            ignore_eos=ignore_eos,
        ),
        response=gen_pb.ResponseOptions(token_ids=token_ids, logprobs=logprobs, top_n=top_n),
    )
    if s.seed is not None:
        req.sampling.seed = s.seed
    _fill_input(req, prompt)
    return req


def _timings(t: Any) -> Timings:
    return Timings(
        queue_ms=t.queue_ms,
        prefill_ms=t.prefill_ms,
        ttft_ms=t.ttft_ms,
        decode_ms=t.decode_ms,
        total_ms=t.total_ms,
    )


def _logprobs(tokens: Any) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(t.token_id, t.logprob, tuple((x.token_id, x.text, x.logprob) for x in t.top))
        for t in tokens
    )


def _stop_reason(value: int) -> str:
    return "" if value == 0 else gen_pb.StopReason.Name(value)  # type: ignore[arg-type]


def to_generation(r: gen_pb.GenerateResponse) -> Generation:
    return Generation(
        request_id=r.request_id,
        model=r.model,
        model_digest=r.model_digest,
        text=r.text,
        token_ids=tuple(r.token_ids),
        logprobs=_logprobs(r.tokens),
        stop_reason=_stop_reason(r.stop_reason),
        stop_sequence=r.stop_sequence,
        input_tokens=r.usage.input_tokens,
        generated_tokens=r.usage.generated_tokens,
        timings=_timings(r.timings),
    )


def to_chunk(r: gen_pb.GenerateStreamResponse) -> StreamChunk:
    last = r.stop_reason != 0
    return StreamChunk(
        text=r.text,
        token_ids=tuple(r.token_ids),
        logprobs=_logprobs(r.tokens),
        stop_reason=_stop_reason(r.stop_reason),
        stop_sequence=r.stop_sequence,
        input_tokens=r.usage.input_tokens,
        generated_tokens=r.usage.generated_tokens,
        timings=_timings(r.timings) if last else None,
        request_id=r.request_id,
        model=r.model,
        model_digest=r.model_digest,
    )


def score_request(prompt: Prompt, labels: Sequence[str], model: str) -> gen_pb.ScoreRequest:
    req = gen_pb.ScoreRequest(model=_model_ref(model), labels=list(labels))
    _fill_input(req, prompt)
    return req


def to_score(r: gen_pb.ScoreResponse, latency_ms: float) -> ScoreResult:
    return ScoreResult(
        request_id=r.request_id,
        model=r.model,
        model_digest=r.model_digest,
        scores=tuple(LabelScore(s.label, s.logprob, s.probability, s.num_tokens) for s in r.scores),
        input_tokens=r.input_tokens,
        latency_ms=latency_ms,
    )


def to_model_info(m: models_pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        version=m.version,
        aliases=tuple(m.aliases),
        digest=m.digest,
        parent=m.parent,
        source=m.source,
        recipe=m.recipe,
        device=m.device,
        dtype=m.dtype,
        backend=m.backend,
        quantization=m.quantization,
        parameters=m.parameters,
        max_context=m.max_context,
        max_batch=m.max_batch,
        kv_bytes_per_sequence=m.kv_bytes_per_sequence,
        has_chat_template=m.has_chat_template,
        metrics=dict(m.metrics),
        is_default=m.is_default,
        state=m.state,
    )


def _metadata(token: str | None, request_id: str | None) -> list[tuple[str, str]]:
    md = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    if request_id:
        md.append(("x-request-id", request_id))
    return md


class Client:
    """Blocking client. Use as a context manager or call `close()`."""

    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:50051",
        *,
        timeout: float | None = 60.0,
        retries: int = 3,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        addr, options = channel_target(target)
        self._channel = (
            grpc.secure_channel(addr, credentials, options=options)
            if credentials
            else grpc.insecure_channel(addr, options=options)
        )
        self._gen = gen_grpc.GenerationServiceStub(self._channel)
        self._models = models_grpc.ModelServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout
        self.retries = retries
        self._token = token

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, fn: Any, request: Any, timeout: float | None, request_id: str | None) -> Any:
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return fn(
                    request,
                    timeout=timeout if timeout is not None else self.timeout,
                    metadata=_metadata(self._token, request_id),
                )
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                if isinstance(exc, Unavailable) and attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise exc from None
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
        req = generate_request(prompt, **options)
        return to_generation(self._call(self._gen.Generate, req, timeout, request_id))

    def stream(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> Iterator[StreamChunk]:
        """Yield chunks as tokens are produced; closing the iterator cancels the call."""
        req = generate_request(prompt, **options)
        delay = 0.1
        for attempt in range(self.retries + 1):
            call = self._gen.GenerateStream(
                req,
                timeout=timeout if timeout is not None else self.timeout,
                metadata=_metadata(self._token, request_id),
            )
            started = False
            try:
                for msg in call:
                    started = True
                    yield to_chunk(msg)
                return
            except grpc.RpcError as err:
                exc = from_rpc_error(err)
                if isinstance(exc, Unavailable) and not started and attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise exc from None
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
        """Probabilities of `labels` as continuations of `prompt`, in one forward pass."""
        t0 = time.perf_counter()
        r = self._call(self._gen.Score, score_request(prompt, labels, model), timeout, request_id)
        return to_score(r, (time.perf_counter() - t0) * 1e3)

    def tokenize(self, prompt: Prompt, *, model: str = "") -> list[int]:
        req = gen_pb.TokenizeRequest(model=_model_ref(model))
        _fill_input(req, prompt)
        return list(self._call(self._gen.Tokenize, req, None, None).token_ids)

    def models(self) -> list[ModelInfo]:
        r = self._call(self._models.ListModels, models_pb.ListModelsRequest(), None, None)
        return [to_model_info(m) for m in r.models]

    def model_info(self, model: str = "") -> ModelInfo:
        name, _, ref = model.partition("@")
        req = models_pb.GetModelInfoRequest(name=name, ref=ref)
        return to_model_info(self._call(self._models.GetModelInfo, req, None, None))

    def load_model(self, model: str, *, make_default: bool = False) -> ModelInfo:
        name, _, ref = model.partition("@")
        req = models_pb.LoadModelRequest(name=name, ref=ref, make_default=make_default)
        return to_model_info(self._call(self._models.LoadModel, req, 600.0, None).model)

    def unload_model(self, name: str) -> None:
        self._call(self._models.UnloadModel, models_pb.UnloadModelRequest(name=name), None, None)

    def health(self, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING', ... for the server or one service."""
        req = health_pb2.HealthCheckRequest(service=service)
        r = self._call(self._health.Check, req, 5.0, None)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the server reports SERVING."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except ClientError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable("UNAVAILABLE", f"server not SERVING after {timeout:.0f}s")
            time.sleep(0.2)


class AsyncClient:
    """asyncio client over `grpc.aio`. Use `async with` or `await close()`."""

    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:50051",
        *,
        timeout: float | None = 60.0,
        retries: int = 3,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        addr, options = channel_target(target)
        self._channel = (
            grpc.aio.secure_channel(addr, credentials, options=options)
            if credentials
            else grpc.aio.insecure_channel(addr, options=options)
        )
        self._gen = gen_grpc.GenerationServiceStub(self._channel)
        self._models = models_grpc.ModelServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout
        self.retries = retries
        self._token = token

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(
        self, fn: Any, request: Any, timeout: float | None, request_id: str | None
    ) -> Any:
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return await fn(
                    request,
                    timeout=timeout if timeout is not None else self.timeout,
                    metadata=_metadata(self._token, request_id),
                )
            except grpc.aio.AioRpcError as err:
                exc = from_rpc_error(err)
                if isinstance(exc, Unavailable) and attempt < self.retries:
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                raise exc from None
        raise AssertionError("unreachable")

    async def generate(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> Generation:
        req = generate_request(prompt, **options)
        return to_generation(await self._call(self._gen.Generate, req, timeout, request_id))

    async def stream(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> AsyncIterator[StreamChunk]:
        """Async-iterate chunks; leaving the loop early cancels the call."""
        req = generate_request(prompt, **options)
        call = self._gen.GenerateStream(
            req,
            timeout=timeout if timeout is not None else self.timeout,
            metadata=_metadata(self._token, request_id),
        )
        try:
            async for msg in call:
                yield to_chunk(msg)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
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
        t0 = time.perf_counter()
        r = await self._call(
            self._gen.Score, score_request(prompt, labels, model), timeout, request_id
        )
        return to_score(r, (time.perf_counter() - t0) * 1e3)

    async def models(self) -> list[ModelInfo]:
        r = await self._call(self._models.ListModels, models_pb.ListModelsRequest(), None, None)
        return [to_model_info(m) for m in r.models]

    async def health(self, service: str = "") -> str:
        req = health_pb2.HealthCheckRequest(service=service)
        r = await self._call(self._health.Check, req, 5.0, None)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
