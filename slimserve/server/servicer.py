"""gRPC handlers: protobuf in → door-neutral spec → `Generation` → protobuf out. Kept thin."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from slimserve.engine.loader import LoadedModel
from slimserve.engine.manager import ModelManager
from slimserve.server import convert, errors, logs
from slimserve.server.generation import Generation, Run
from slimserve.v1 import generation_pb2 as gen_pb
from slimserve.v1 import generation_pb2_grpc as gen_grpc
from slimserve.v1 import models_pb2 as models_pb
from slimserve.v1 import models_pb2_grpc as models_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code `exc` earns on the gRPC door (`errors.ERRORS`)."""
    return errors.kind_of(exc).grpc


async def _abort(
    context: grpc.aio.ServicerContext, exc: BaseException, request: Any = None
) -> NoReturn:
    """Answer `exc` with its status; an invalid field named as `request` sent it."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc  # already a status
    kind = errors.kind_of(exc)
    errors.report(exc)  # an internal error's detail: the log's, with the request id
    await context.abort(kind.grpc, errors.message(exc, convert.fields_of(request)))
    raise AssertionError("unreachable")  # context.abort raises


async def guard(
    context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]], request: Any = None
) -> T:
    """Run a unary handler body; every exception becomes a status (never UNKNOWN)."""
    try:
        return await fn()
    except Exception as exc:  # CancelledError is a BaseException and passes through
        await _abort(context, exc, request)


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The id the request interceptor chose (from `x-request-id` or fresh)."""
    return logs.REQUEST_ID.get() or logs.request_id_from(context.invocation_metadata())


class GenerationServicer(gen_grpc.GenerationServiceServicer):
    """The gRPC door: protobuf in (`convert`), `Generation` in between, protobuf out."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    async def _start(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> Run:
        spec = convert.generate_spec(request, context.time_remaining())
        (run,) = await self.generation.start(spec, request_id(context))
        return run

    async def Generate(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.GenerateResponse:
        async def run() -> gen_pb.GenerateResponse:
            one = await self._start(request, context)
            events = await self.generation.collect(one, "Generate")
            return convert.unary_response(
                events, one.model, one.request.request_id, request.response.token_ids
            )

        return await guard(context, run, request)

    async def GenerateStream(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateStreamResponse]:
        try:
            run = await self._start(request, context)
        except Exception as exc:
            await _abort(context, exc, request)
        try:
            yield gen_pb.GenerateStreamResponse(
                request_id=run.request.request_id,
                model=run.model.ref,
                model_digest=run.model.artifact.digest,
                usage=gen_pb.Usage(input_tokens=run.accepted.input_tokens),
            )
            async for event in self.generation.events(run, "GenerateStream"):
                yield convert.stream_message(event, run.model, request.response.token_ids)
        except Exception as exc:  # an engine error for this request
            await _abort(context, exc, request)
        finally:
            # Client cancelled, deadline passed, or we finished: the engine drops the
            # sequence at its next step either way.
            run.cancel()

    async def Score(
        self, request: gen_pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.ScoreResponse:
        async def run() -> gen_pb.ScoreResponse:
            spec = convert.score_spec(request, context.time_remaining())
            scored = await self.generation.score(spec, request_id(context))
            seconds = scored.seconds
            return gen_pb.ScoreResponse(
                request_id=request_id(context),
                model=scored.model.ref,
                model_digest=scored.model.artifact.digest,
                input_tokens=scored.input_tokens,
                scores=[
                    gen_pb.LabelScore(
                        label=s.label,
                        logprob=s.logprob,
                        probability=s.probability,
                        num_tokens=s.num_tokens,
                    )
                    for s in scored.labels
                ],
                timings=gen_pb.Timings(total_ms=seconds * 1e3, ttft_ms=seconds * 1e3),
            )

        return await guard(context, run, request)

    async def Tokenize(
        self, request: gen_pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.TokenizeResponse:
        async def run() -> gen_pb.TokenizeResponse:
            model, result = await self.generation.tokenize(convert.tokenize_spec(request))
            return gen_pb.TokenizeResponse(
                model=model.ref,
                token_ids=result.ids,
                tokens=[t or "" for t in result.tokens],
            )

        return await guard(context, run, request)


class ModelServicer(models_grpc.ModelServiceServicer):
    def __init__(self, models: ModelManager) -> None:
        self.models = models

    async def _info(self, model: LoadedModel) -> models_pb.ModelInfo:
        aliases = self.models.registry.aliases_of(model.name, model.artifact.version)
        stats = None
        if model.info.draft and model.engine.serving:  # the draft's running acceptance
            stats = await asyncio.to_thread(model.engine.stats)  # a pipe round trip
        return convert.model_info(
            model, is_default=self.models.is_default(model), aliases=aliases, stats=stats
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
                self.models.load,
                request.name,
                request.ref,
                make_default=request.make_default,
                beside=request.beside,
            )
            logs.annotate(model=loaded.ref)
            return models_pb.LoadModelResponse(model=await self._info(loaded))

        return await guard(context, run)

    async def UnloadModel(
        self, request: models_pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb.UnloadModelResponse:
        async def run() -> models_pb.UnloadModelResponse:
            await asyncio.to_thread(self.models.unload, request.name, request.ref)
            return models_pb.UnloadModelResponse()

        return await guard(context, run)
