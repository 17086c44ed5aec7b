"""gRPC handlers: protobuf in → domain request → engine → protobuf out. Kept thin."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from slimserve.compression.errors import CompressionError
from slimserve.service import convert
from slimserve.service.config import Limits
from slimserve.service.errors import (
    IntegrityFailure,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    Overloaded,
    ServiceError,
)
from slimserve.service.models import LoadedModel, ModelManager
from slimserve.service.types import Event
from slimserve.v1 import generation_pb2 as gen_pb
from slimserve.v1 import generation_pb2_grpc as gen_grpc
from slimserve.v1 import models_pb2 as models_pb
from slimserve.v1 import models_pb2_grpc as models_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

# The one table from domain errors to status codes; anything else is INTERNAL (logged).
STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (IntegrityFailure, grpc.StatusCode.DATA_LOSS),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc)
        await context.abort(code, f"internal error: {type(exc).__name__}")
    await context.abort(code, str(exc))
    raise AssertionError("unreachable")  # context.abort raises


def request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


class _EventQueue:
    """Carries engine events (worker thread) to the handler (event loop)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:  # called on the engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self) -> Event:
        return await self._queue.get()


class GenerationServicer(gen_grpc.GenerationServiceServicer):
    def __init__(self, models: ModelManager, limits: Limits) -> None:
        self.models = models
        self.limits = limits

    async def _guard(self, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (ServiceError, CompressionError) as exc:
            await _abort(context, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    def _model(self, ref: Any) -> LoadedModel:
        return self.models.get(ref.name, ref.ref)

    async def Generate(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.GenerateResponse:
        async def run() -> gen_pb.GenerateResponse:
            rid = request_id(context)
            model = self._model(request.model)
            req = convert.generation_request(
                request, model, self.limits, rid, context.time_remaining()
            )
            queue = _EventQueue()
            handle = model.engine.submit(req, queue.put)
            events: list[Event] = []
            try:
                while True:
                    event = await queue.get()
                    if event.error is not None:
                        raise event.error
                    events.append(event)
                    if event.finish is not None:
                        return convert.unary_response(
                            events, model, rid, request.response.token_ids
                        )
            finally:
                handle.cancel()  # no-op once finished; frees the slot if the call died

        return await self._guard(context, run)

    async def GenerateStream(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateStreamResponse]:
        rid = request_id(context)
        try:
            model = self._model(request.model)
            req = convert.generation_request(
                request, model, self.limits, rid, context.time_remaining()
            )
            queue = _EventQueue()
            handle = model.engine.submit(req, queue.put)
        except (ServiceError, CompressionError) as exc:
            await _abort(context, exc)
        try:
            yield gen_pb.GenerateStreamResponse(
                request_id=rid,
                model=model.ref,
                model_digest=model.artifact.digest,
                usage=gen_pb.Usage(input_tokens=len(req.prompt_ids)),
            )
            while True:
                event = await queue.get()
                if event.error is not None:
                    await _abort(context, event.error)
                yield convert.stream_message(event, model, request.response.token_ids)
                if event.finish is not None:
                    return
        finally:
            # Client cancelled, deadline passed, or we finished: the engine drops the
            # sequence at its next step either way.
            handle.cancel()

    async def Score(
        self, request: gen_pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.ScoreResponse:
        async def run() -> gen_pb.ScoreResponse:
            import math
            import time

            t0 = time.monotonic()
            rid = request_id(context)
            model = self._model(request.model)
            prompt = list(convert.prompt_ids(request, model, self.limits))
            labels = convert.score_labels(request, model, self.limits)
            longest = len(prompt) + max(map(len, labels))
            if longest > model.max_context:
                raise InvalidRequest(
                    "labels", f"prompt + label is {longest} tokens; context is {model.max_context}"
                )
            logps = await asyncio.wrap_future(model.engine.score(prompt, labels))
            top = max(logps)
            norm = math.log(sum(math.exp(lp - top) for lp in logps)) + top
            total_ms = (time.monotonic() - t0) * 1e3
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
                timings=gen_pb.Timings(total_ms=total_ms, ttft_ms=total_ms),
            )

        return await self._guard(context, run)

    async def Tokenize(
        self, request: gen_pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.TokenizeResponse:
        async def run() -> gen_pb.TokenizeResponse:
            model = self._model(request.model)
            ids = convert.prompt_ids(request, model, self.limits)
            tokens = (
                model.tokenizer.convert_ids_to_tokens(list(ids)) if request.return_tokens else []
            )
            return gen_pb.TokenizeResponse(model=model.ref, token_ids=ids, tokens=tokens)

        return await self._guard(context, run)


class ModelServicer(models_grpc.ModelServiceServicer):
    def __init__(self, models: ModelManager) -> None:
        self.models = models

    def _info(self, model: LoadedModel) -> models_pb.ModelInfo:
        aliases = self.models.registry.aliases_of(model.name, model.artifact.version)
        return convert.model_info(
            model, is_default=model.name == self.models.default_name, aliases=aliases
        )

    async def ListModels(
        self, request: models_pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb.ListModelsResponse:
        return models_pb.ListModelsResponse(models=[self._info(m) for m in self.models.all()])

    async def GetModelInfo(
        self, request: models_pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> models_pb.ModelInfo:
        try:
            return self._info(self.models.get(request.name, request.ref))
        except (ServiceError, CompressionError) as exc:
            await _abort(context, exc)

    async def LoadModel(
        self, request: models_pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb.LoadModelResponse:
        try:
            loaded = await asyncio.to_thread(
                self.models.load, request.name, request.ref, make_default=request.make_default
            )
        except (ServiceError, CompressionError) as exc:
            await _abort(context, exc)
        return models_pb.LoadModelResponse(model=self._info(loaded))

    async def UnloadModel(
        self, request: models_pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb.UnloadModelResponse:
        try:
            await asyncio.to_thread(self.models.unload, request.name)
        except ServiceError as exc:
            await _abort(context, exc)
        return models_pb.UnloadModelResponse()
