"""gRPC handlers: protobuf in → domain request → engine → protobuf out. Kept thin."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from slimserve.engine.errors import (
    DeadlineExpired,
    EngineFailure,
    IntegrityFailure,
    InvalidRequest,
    LoadFailed,
    NotReady,
    Overloaded,
    UnknownModel,
)
from slimserve.engine.loader import HandleLike, LoadedModel
from slimserve.engine.manager import ModelManager
from slimserve.engine.types import Event, GenerationRequest, StopReason
from slimserve.registry.errors import IntegrityError, RegistryError
from slimserve.server import convert, logs
from slimserve.server.config import Limits
from slimserve.server.metrics import Metrics
from slimserve.v1 import generation_pb2 as gen_pb
from slimserve.v1 import generation_pb2_grpc as gen_grpc
from slimserve.v1 import models_pb2 as models_pb
from slimserve.v1 import models_pb2_grpc as models_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

# The one table from domain errors to status codes; anything else is INTERNAL (logged).
STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModel, grpc.StatusCode.NOT_FOUND),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (IntegrityFailure, grpc.StatusCode.DATA_LOSS),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (EngineFailure, grpc.StatusCode.INTERNAL),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (LoadFailed, grpc.StatusCode.FAILED_PRECONDITION),
    # Other registry errors (a bad name or alias in a request) are the caller's to fix.
    (RegistryError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc  # already a status
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:  # the detail is the log's, with the request id
        rid = logs.REQUEST_ID.get() or "-"
        engine = isinstance(exc, EngineFailure)
        log.error("internal error (request id %s): %s", rid, exc, exc_info=None if engine else exc)
        await context.abort(code, f"internal error (request id {rid})")
    await context.abort(code, str(exc))
    raise AssertionError("unreachable")  # context.abort raises


async def guard(context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
    """Run a unary handler body; every exception becomes a status (never UNKNOWN)."""
    try:
        return await fn()
    except Exception as exc:  # CancelledError is a BaseException and passes through
        await _abort(context, exc)


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The id the request interceptor chose (from `x-request-id` or fresh)."""
    return logs.REQUEST_ID.get() or logs.request_id_from(context.invocation_metadata())


class EventQueue:
    """Carries engine events (worker thread) to the handler (event loop)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:  # called on the engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self) -> Event:
        return await self._queue.get()


class GenerationServicer(gen_grpc.GenerationServiceServicer):
    def __init__(self, models: ModelManager, limits: Limits, metrics: Metrics) -> None:
        self.models = models
        self.limits = limits
        self.metrics = metrics

    def _model(self, ref: Any) -> LoadedModel:
        return self.models.get(ref.name, ref.ref)

    async def submit(
        self, name: str, ref: str, build: Callable[[LoadedModel], GenerationRequest]
    ) -> tuple[LoadedModel, GenerationRequest, HandleLike, EventQueue]:
        """Resolve the model, `build` the engine request off the event loop (tokenizing and
        templating a long prompt must not stall the other streams), submit. A swap can
        retire the version between the two steps; then the request goes to the version now
        serving (once). Every door starts its generations here."""
        queue = EventQueue()
        for attempt in range(2):
            model = self.models.get(name, ref)
            logs.annotate(model=model.ref)
            req = await asyncio.to_thread(build, model)
            try:
                return model, req, model.engine.submit(req, queue.put), queue
            except NotReady:
                if attempt or self.models.get(name, ref) is model:
                    raise
        raise AssertionError("unreachable")

    async def _start(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[LoadedModel, GenerationRequest, HandleLike, EventQueue]:
        rid, remaining = request_id(context), context.time_remaining()
        return await self.submit(
            request.model.name,
            request.model.ref,
            lambda m: convert.generation_request(request, m, self.limits, rid, remaining),
        )

    async def events(
        self, model: LoadedModel, queue: EventQueue, method: str, t0: float
    ) -> AsyncIterator[Event]:
        """Engine events until the finish; records token gaps and the finished request
        (every door reads its engine events through this, so metrics agree).

        Raises DeadlineExpired when the engine stopped the request because its deadline
        passed: the caller must not get an OK answer for a truncated generation.
        """
        last_token = 0.0
        while True:
            event = await queue.get()
            if event.error is not None:
                raise event.error
            f = event.finish
            if f is not None and f.reason is StopReason.DEADLINE:
                raise DeadlineExpired(
                    f"deadline exceeded after {f.generated_tokens} generated tokens"
                )
            if event.token_ids:
                now = time.monotonic()
                if last_token:
                    self.metrics.token_gap(model, now - last_token)
                last_token = now
            if event.finish is not None:
                f = event.finish
                self.metrics.finished(model, f, method, time.monotonic() - t0)
                logs.annotate(
                    stop_reason=f.reason.value,
                    input_tokens=f.input_tokens,
                    generated_tokens=f.generated_tokens,
                )
            yield event
            if event.finish is not None:
                return

    async def Generate(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.GenerateResponse:
        async def run() -> gen_pb.GenerateResponse:
            t0 = time.monotonic()
            model, req, handle, queue = await self._start(request, context)
            events: list[Event] = []
            try:
                async for event in self.events(model, queue, "Generate", t0):
                    events.append(event)
                return convert.unary_response(
                    events, model, req.request_id, request.response.token_ids
                )
            finally:
                handle.cancel()  # no-op once finished; frees the slot if the call died

        return await guard(context, run)

    async def GenerateStream(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateStreamResponse]:
        t0 = time.monotonic()
        try:
            model, req, handle, queue = await self._start(request, context)
        except Exception as exc:
            await _abort(context, exc)
        try:
            yield gen_pb.GenerateStreamResponse(
                request_id=req.request_id,
                model=model.ref,
                model_digest=model.artifact.digest,
                usage=gen_pb.Usage(input_tokens=len(req.prompt_ids)),
            )
            async for event in self.events(model, queue, "GenerateStream", t0):
                yield convert.stream_message(event, model, request.response.token_ids)
        except Exception as exc:  # an engine error for this request
            await _abort(context, exc)
        finally:
            # Client cancelled, deadline passed, or we finished: the engine drops the
            # sequence at its next step either way.
            handle.cancel()

    async def Score(
        self, request: gen_pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.ScoreResponse:
        async def run() -> gen_pb.ScoreResponse:
            t0 = time.monotonic()
            rid = request_id(context)
            model = self._model(request.model)
            logs.annotate(model=model.ref)
            prompt, labels = await asyncio.to_thread(
                convert.score_inputs, request, model, self.limits
            )
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            try:
                logps = await asyncio.wrap_future(model.engine.score(prompt, labels, deadline))
            except EngineFailure as exc:  # e.g. a non-finite score: say which model gave it
                raise EngineFailure(f"{model.ref}: {exc}") from exc
            top = max(logps)
            norm = math.log(sum(math.exp(lp - top) for lp in logps)) + top
            seconds = time.monotonic() - t0
            self.metrics.scored(model, len(prompt), seconds)
            return gen_pb.ScoreResponse(
                request_id=rid,
                model=model.ref,
                model_digest=model.artifact.digest,
                input_tokens=len(prompt),
                scores=[
                    gen_pb.LabelScore(
                        label=label,
                        logprob=lp,
                        probability=math.exp(lp - norm),
                        num_tokens=len(ids),
                    )
                    for label, lp, ids in zip(request.labels, logps, labels, strict=True)
                ],
                timings=gen_pb.Timings(total_ms=seconds * 1e3, ttft_ms=seconds * 1e3),
            )

        return await guard(context, run)

    async def Tokenize(
        self, request: gen_pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.TokenizeResponse:
        async def run() -> gen_pb.TokenizeResponse:
            model = self._model(request.model)
            logs.annotate(model=model.ref)
            ids = await asyncio.to_thread(convert.prompt_ids, request, model, self.limits)
            tokens = (
                model.tokenizer.convert_ids_to_tokens(list(ids)) if request.return_tokens else []
            )
            return gen_pb.TokenizeResponse(model=model.ref, token_ids=ids, tokens=tokens)

        return await guard(context, run)


class ModelServicer(models_grpc.ModelServiceServicer):
    def __init__(self, models: ModelManager) -> None:
        self.models = models

    async def _info(self, model: LoadedModel) -> models_pb.ModelInfo:
        aliases = self.models.registry.aliases_of(model.name, model.artifact.version)
        stats = None
        if model.info.draft and model.engine.serving:  # the draft's running acceptance
            stats = await asyncio.to_thread(model.engine.stats)  # a pipe round trip
        return convert.model_info(
            model, is_default=model.name == self.models.default_name, aliases=aliases, stats=stats
        )

    async def ListModels(
        self, request: models_pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb.ListModelsResponse:
        async def run() -> models_pb.ListModelsResponse:
            infos = [await self._info(m) for m in self.models.all()]
            return models_pb.ListModelsResponse(models=infos)

        return await guard(context, run)

    async def GetModelInfo(
        self, request: models_pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> models_pb.ModelInfo:
        async def run() -> models_pb.ModelInfo:
            return await self._info(self.models.get(request.name, request.ref))

        return await guard(context, run)

    async def LoadModel(
        self, request: models_pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb.LoadModelResponse:
        async def run() -> models_pb.LoadModelResponse:
            loaded = await asyncio.to_thread(
                self.models.load, request.name, request.ref, make_default=request.make_default
            )
            logs.annotate(model=loaded.ref)
            return models_pb.LoadModelResponse(model=await self._info(loaded))

        return await guard(context, run)

    async def UnloadModel(
        self, request: models_pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb.UnloadModelResponse:
        async def run() -> models_pb.UnloadModelResponse:
            await asyncio.to_thread(self.models.unload, request.name)
            return models_pb.UnloadModelResponse()

        return await guard(context, run)
