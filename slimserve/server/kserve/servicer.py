"""Triton's GRPCInferenceService (KServe v2 plus ModelStreamInfer) on slimserve's port.

Thin twice over: a KServe request is read into a slimserve GenerateRequest or ScoreRequest
(`signature.read_call`) and answered by the very `GenerationServicer` handler that serves
`slimserve.v1`, so validation, limits, metrics and the status code of every error (the one
`STATUS` table) are those of slimserve's own door. Health is the server's health service:
ready means its overall status is SERVING.

ModelStreamInfer is Triton's decoupled stream: requests may be sent while earlier ones are
still answering, and each is answered on its own. With `stream` true every text delta is
one response; a request's last response carries the parameter `triton_final_response:
true` (all others false), or, when the request sets `triton_enable_empty_final_response`,
is followed by an empty response that carries it. A failing request gets one response with
`error_message` ("CODE: details", the code slimserve's door would answer) and the stream
goes on, as Triton does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2

from slimserve import __version__
from slimserve.engine.errors import InvalidRequest, NotReady, UnknownModel
from slimserve.engine.manager import ModelManager
from slimserve.registry.store import parse_model_ref
from slimserve.server.kserve import signature
from slimserve.server.kserve.signature import InferCall
from slimserve.server.kserve.tensors import bytes_output, fp64_output
from slimserve.server.servicer import GenerationServicer, guard
from slimserve.v1 import generation_pb2 as gen_pb
from slimserve.v1.inference import grpc_service_pb2 as pb
from slimserve.v1.inference import grpc_service_pb2_grpc as kserve_grpc

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"

Output = tuple[pb.ModelInferResponse.InferOutputTensor, bytes]
Send = Callable[[pb.ModelStreamInferResponse], None]


class RequestFailed(grpc.aio.AbortError):  # type: ignore[misc]
    """One request of a stream failed with this status; the stream itself goes on."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _OneRequest:
    """A stream's context as one request in it sees it: an abort fails that request only."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> NoReturn:
        raise RequestFailed(code, details)


def _unimplemented(method: str) -> Callable[..., Awaitable[NoReturn]]:
    async def refuse(self: Any, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not served here (see ModelMetadata for what is)",
        )
        raise AssertionError("unreachable")  # context.abort raises

    return refuse


class InferenceServicer(kserve_grpc.GRPCInferenceServiceServicer):
    def __init__(self, generation: GenerationServicer, models: ModelManager, health: Any) -> None:
        """`health`: the server's grpc.health.v1 servicer, whose "" status is readiness."""
        self.generation = generation
        self.models = models
        self.health = health

    async def _ready(self, context: grpc.aio.ServicerContext) -> bool:
        status = await self.health.Check(health_pb2.HealthCheckRequest(service=""), context)
        return bool(status.status == health_pb2.HealthCheckResponse.SERVING)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._ready(context))

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        async def run() -> pb.ModelReadyResponse:
            if not await self._ready(context):
                return pb.ModelReadyResponse(ready=False)
            try:
                model = self.models.get(request.name, request.version)
            except (UnknownModel, NotReady):
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=self.models.serving(model.name))

        return await guard(context, run)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="slimserve", version=__version__)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async def run() -> pb.ModelMetadataResponse:
            model = self.models.get(request.name, request.version)
            return pb.ModelMetadataResponse(
                name=model.name,
                versions=[str(model.artifact.version)],
                platform="slimserve",
                inputs=_tensors(signature.INPUTS),
                outputs=_tensors(signature.OUTPUTS),
            )

        return await guard(context, run)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        async def run() -> pb.ModelInferResponse:
            call = signature.read_call(request)
            if call.stream:
                raise InvalidRequest(
                    f"inputs[{signature.STREAM}]", "streaming needs ModelStreamInfer"
                )
            return await self._infer(request, call, context)

        return await guard(context, run)

    async def _infer(
        self, request: pb.ModelInferRequest, call: InferCall, context: Any
    ) -> pb.ModelInferResponse:
        """The whole answer at once: the text, or the scores."""
        if call.score is not None:
            scored = await self.generation.Score(call.score, context)
            values = {
                signature.LABEL_LOGPROB: [s.logprob for s in scored.scores],
                signature.LABEL_PROBABILITY: [s.probability for s in scored.scores],
            }
            return _response(
                request, scored.model, [fp64_output(n, values[n]) for n in call.outputs]
            )
        assert call.generate is not None  # read_call sets one of the two
        done = await self.generation.Generate(call.generate, context)
        text = (call.generate.text if call.include_prompt else "") + done.text
        return _response(request, done.model, [_text(text)])

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        answering: set[asyncio.Task[None]] = set()

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(self._answer(request, context, out.put_nowait))
                answering.add(task)
                task.add_done_callback(answering.discard)
            while answering:  # the client is done sending; finish what it asked
                await asyncio.wait(set(answering))

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: out.put_nowait(None))
        try:
            while (message := await out.get()) is not None:
                yield message
            await reader  # raises what ended the reading, if anything did
        finally:
            reader.cancel()
            for task in list(answering):
                task.cancel()  # the call ended: each cancelled generation frees its slot

    async def _answer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, send: Send
    ) -> None:
        """Answer one request of a stream; a failure becomes its error response."""
        one = _OneRequest(context)
        try:
            await guard(one, lambda: self._stream_one(request, one, send))
        except RequestFailed as failed:
            error = _header(request.id, request.model_name, request.model_version)
            error.parameters[FINAL].bool_param = True
            send(pb.ModelStreamInferResponse(error_message=str(failed), infer_response=error))

    async def _stream_one(self, request: pb.ModelInferRequest, context: Any, send: Send) -> None:
        call = signature.read_call(request)
        empty_final = (
            EMPTY_FINAL in request.parameters and request.parameters[EMPTY_FINAL].bool_param
        )
        if not call.stream:
            _send(
                send, await self._infer(request, call, context), final=True, empty_final=empty_final
            )
            return
        assert call.generate is not None  # read_call streams only generation
        chunks = aiter(self.generation.GenerateStream(call.generate, context))
        model = (await anext(chunks)).model  # the first message names the model, no text
        async for chunk in chunks:
            final = chunk.stop_reason != gen_pb.STOP_REASON_UNSPECIFIED
            response = _response(request, model, [_text(chunk.text)])
            _send(send, response, final=final, empty_final=empty_final)

    # The rest of Triton's service: model repository, statistics, shared memory, tracing.
    ModelConfig = _unimplemented("ModelConfig")
    ModelStatistics = _unimplemented("ModelStatistics")
    RepositoryIndex = _unimplemented("RepositoryIndex")
    RepositoryModelLoad = _unimplemented("RepositoryModelLoad")
    RepositoryModelUnload = _unimplemented("RepositoryModelUnload")
    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")


def _send(send: Send, response: pb.ModelInferResponse, *, final: bool, empty_final: bool) -> None:
    """A response of a stream, marked final or not; an empty final one follows if asked."""
    response.parameters[FINAL].bool_param = final and not empty_final
    send(pb.ModelStreamInferResponse(infer_response=response))
    if final and empty_final:
        last = _header(response.id, response.model_name, response.model_version)
        last.parameters[FINAL].bool_param = True
        send(pb.ModelStreamInferResponse(infer_response=last))


def _header(request_id: str, model_name: str, model_version: str) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)


def _response(
    request: pb.ModelInferRequest, model_ref: str, outputs: list[Output]
) -> pb.ModelInferResponse:
    """A response naming the version that answered (`model_ref` is "name@version")."""
    name, version = parse_model_ref(model_ref)
    response = _header(request.id, name, version)
    response.outputs.extend(meta for meta, _ in outputs)
    response.raw_output_contents.extend(raw for _, raw in outputs)
    return response


def _text(text: str) -> Output:
    return bytes_output(signature.TEXT_OUTPUT, [text.encode()])


def _tensors(
    spec: dict[str, tuple[str, list[int]]],
) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)
        for name, (datatype, shape) in spec.items()
    ]
