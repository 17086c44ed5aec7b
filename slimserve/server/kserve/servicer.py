"""Triton's GRPCInferenceService (KServe v2 plus ModelStreamInfer) on slimserve's port.

Thin: a KServe request is read into a door-neutral spec (`signature.read_call`) and
answered through `generation.Generation`, as every door is, so validation, limits, metrics
and the status code of every error (`errors.ERRORS`) are those of slimserve's own doors.
Health is the server's health service: ready means its overall status is SERVING.

A stream is bounded: at most `MAX_IN_FLIGHT_PER_STREAM` of its requests answer at once
(and `MAX_IN_FLIGHT` over the server); beyond that the stream is not read, so gRPC's flow
control holds a client that sends faster than it is answered, instead of the server's
memory. A large request's tensors are decoded on a worker thread, off the event loop.

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
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from slimserve import __version__
from slimserve.engine.errors import InvalidRequest, NotReady, UnknownModel
from slimserve.engine.manager import ModelManager
from slimserve.registry.store import parse_model_ref
from slimserve.server import errors, logs
from slimserve.server.generation import Generation
from slimserve.server.kserve import signature
from slimserve.server.kserve.signature import InferCall
from slimserve.server.kserve.tensors import bytes_output, fp64_output
from slimserve.v1.inference import grpc_service_pb2 as pb
from slimserve.v1.inference import grpc_service_pb2_grpc as kserve_grpc

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
#: Requests of one stream answering at once, and of every stream together.
MAX_IN_FLIGHT_PER_STREAM = 32
MAX_IN_FLIGHT = 256
#: Requests larger than this (bytes) are decoded on a worker thread.
OFF_LOOP_BYTES = 64 * 1024

log = logging.getLogger(__name__)

T = TypeVar("T")
Output = tuple[pb.ModelInferResponse.InferOutputTensor, bytes]
Send = Callable[[pb.ModelStreamInferResponse], None]


class RequestFailed(grpc.aio.AbortError):  # type: ignore[misc]
    """One request of a stream failed with this status; the stream itself goes on."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    kind = errors.kind_of(exc)
    errors.report(exc)  # an internal error's detail: the log's, with the request id
    await context.abort(kind.grpc, errors.message(exc, signature.FIELDS))
    raise AssertionError("unreachable")  # context.abort raises


async def _guarded(context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except Exception as exc:  # CancelledError passes through
        await _abort(context, exc)


def _failure(exc: BaseException) -> RequestFailed:
    """`exc` as one stream request's failure."""
    kind = errors.kind_of(exc)
    errors.report(exc)
    return RequestFailed(kind.grpc, errors.message(exc, signature.FIELDS))


def _unimplemented(method: str) -> Callable[..., Awaitable[NoReturn]]:
    async def refuse(self: Any, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not served here (see ModelMetadata for what is)",
        )
        raise AssertionError("unreachable")  # context.abort raises

    return refuse


class InferenceServicer(kserve_grpc.GRPCInferenceServiceServicer):
    def __init__(self, generation: Generation, models: ModelManager, health: Any) -> None:
        """`health`: the server's grpc.health.v1 servicer, whose "" status is readiness."""
        self.generation = generation
        self.models = models
        self.health = health
        self._server_slots = asyncio.Semaphore(MAX_IN_FLIGHT)

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
            return pb.ModelReadyResponse(ready=model.engine.serving)

        return await _guarded(context, run)

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
                versions=[str(m.artifact.version) for m in self.models.versions(model.name)],
                platform="slimserve",
                inputs=_tensors(signature.INPUTS),
                outputs=_tensors(signature.OUTPUTS),
            )

        return await _guarded(context, run)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        async def run() -> pb.ModelInferResponse:
            call = await _read(request, context.time_remaining())
            if call.stream:
                raise InvalidRequest(
                    f"inputs[{signature.STREAM}]", "streaming needs ModelStreamInfer"
                )
            return await self._infer(request, call, _request_id(context))

        return await _guarded(context, run)

    async def _infer(
        self, request: pb.ModelInferRequest, call: InferCall, rid: str
    ) -> pb.ModelInferResponse:
        """The whole answer at once: the text, or the scores."""
        if call.score is not None:
            scored = await self.generation.score(call.score, rid)
            values = {
                signature.LABEL_LOGPROB: [s.logprob for s in scored.labels],
                signature.LABEL_PROBABILITY: [s.probability for s in scored.labels],
            }
            return _response(
                request, scored.model.ref, [fp64_output(n, values[n]) for n in call.outputs]
            )
        assert call.generate is not None  # read_call sets one of the two
        (one,) = await self.generation.start(call.generate, rid)
        events = await self.generation.collect(one, "ModelInfer")
        prompt = call.generate.prompt.text or ""
        text = (prompt if call.include_prompt else "") + "".join(e.text for e in events)
        return _response(request, one.model.ref, [_text(text)])

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        answering: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT_PER_STREAM)
        rid = _request_id(context)

        async def answer(request: pb.ModelInferRequest, n: int) -> None:
            try:
                await self._answer(request, context, out.put_nowait, f"{rid}-{n}")
            finally:
                slots.release()
                self._server_slots.release()

        async def read() -> None:
            n = 0
            async for request in request_iterator:
                # Not reading the next request until one may start is what bounds a stream:
                # gRPC's flow control then holds the client, not the server's memory.
                await slots.acquire()
                await self._server_slots.acquire()
                task = asyncio.create_task(answer(request, n))
                n += 1
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
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, send: Send, rid: str
    ) -> None:
        """Answer one request of a stream; a failure becomes its error response."""
        try:
            await self._stream_one(request, context, send, rid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failed = exc if isinstance(exc, RequestFailed) else _failure(exc)
            error = _header(request.id, request.model_name, request.model_version)
            error.parameters[FINAL].bool_param = True
            send(pb.ModelStreamInferResponse(error_message=str(failed), infer_response=error))

    async def _stream_one(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, send: Send, rid: str
    ) -> None:
        call = await _read(request, context.time_remaining())
        empty_final = (
            EMPTY_FINAL in request.parameters and request.parameters[EMPTY_FINAL].bool_param
        )
        if not call.stream:
            answer = await self._infer(request, call, rid)
            _send(send, answer, final=True, empty_final=empty_final)
            return
        assert call.generate is not None  # read_call streams only generation
        (run,) = await self.generation.start(call.generate, rid)
        try:
            async for event in self.generation.events(run, "ModelStreamInfer"):
                final = event.finish is not None
                if event.text or final:
                    response = _response(request, run.model.ref, [_text(event.text)])
                    _send(send, response, final=final, empty_final=empty_final)
        finally:
            run.cancel()

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


async def _read(request: pb.ModelInferRequest, timeout_s: float | None) -> InferCall:
    """The request's tensors as a call; a large request is decoded off the event loop."""
    if request.ByteSize() > OFF_LOOP_BYTES:
        return await asyncio.to_thread(signature.read_call, request, timeout_s)
    return signature.read_call(request, timeout_s)


def _request_id(context: grpc.aio.ServicerContext) -> str:
    return logs.REQUEST_ID.get() or logs.request_id_from(context.invocation_metadata())


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
