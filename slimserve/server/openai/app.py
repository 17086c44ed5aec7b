"""The OpenAI-compatible routes: completions, chat completions, models and health.

Every request goes through `OpenAIApp._door`, the HTTP twin of the gRPC interceptor: the
request id (`x-request-id`, by `logs.request_id_from`), the bearer token (the same
`Gate` and labels as gRPC), the drain count (`InFlight`, shared with gRPC, so a graceful
stop waits for both doors), one access-log line naming the principal, and
`Metrics.http`. Generation itself takes the gRPC door's path: `schema` makes the same
`GenerateRequest`, `convert` validates it, the engine runs it, and the gRPC servicer's
event reader records the same token metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from slimserve.engine.errors import InvalidRequest, NotReady
from slimserve.engine.loader import HandleLike, LoadedModel
from slimserve.engine.manager import ModelManager
from slimserve.engine.types import Event, GenerationRequest
from slimserve.server import convert, logs
from slimserve.server.config import ServerConfig
from slimserve.server.interceptors import Gate, InFlight
from slimserve.server.metrics import Metrics
from slimserve.server.openai import responses as out
from slimserve.server.openai import schema
from slimserve.server.openai.echo import EchoScorer
from slimserve.server.openai.errors import ClientGone, PayloadTooLarge, Unauthorized, error_body
from slimserve.server.openai.stream import DONE, EventStream, Outcome, event
from slimserve.server.servicer import EventQueue, GenerationServicer

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(slots=True)
class Run:
    """One prompt on its way through the engine (`handle` None: nothing to generate)."""

    model: LoadedModel
    request: GenerationRequest
    queue: EventQueue | None = None
    handle: HandleLike | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()  # no-op once finished; frees the slot otherwise


class OpenAIApp:
    """The HTTP door's handlers over the server's models, limits and metrics."""

    def __init__(
        self,
        models: ModelManager,
        config: ServerConfig,
        metrics: Metrics,
        in_flight: InFlight,
        ready: Callable[[], Awaitable[bool]],
    ) -> None:
        """`ready()` says whether the server as a whole serves (the gRPC health's "")."""
        self.models = models
        self.limits = config.limits
        self.metrics = metrics
        self.in_flight = in_flight
        self.ready = ready
        # Model control never passes this door, so only the token check applies.
        self.gate = Gate(config.auth)
        self.generation = GenerationServicer(models, config.limits, metrics)
        self.echo = EchoScorer(config.model.max_score_tokens)

    def app(self) -> Starlette:
        routes = [
            ("/v1/completions", ["POST"], self.completions),
            ("/v1/chat/completions", ["POST"], self.chat_completions),
            ("/v1/models", ["GET"], self.list_models),
            ("/v1/models/{model:path}", ["GET"], self.get_model),
        ]
        return Starlette(
            routes=[
                *(Route(p, self._door(p, h), methods=m) for p, m, h in routes),
                Route("/health/live", self.live, methods=["GET"]),
                Route("/health/ready", self.is_ready, methods=["GET"]),
            ]
        )

    # -- the door: id, auth, drain, errors, access log ---------------------------------

    def _door(self, route: str, handler: Handler) -> Handler:
        async def door(request: Request) -> Response:
            t0 = time.monotonic()
            sent = request.headers.get("x-request-id")
            rid = logs.request_id_from([("x-request-id", sent)] if sent is not None else [])
            principal, refusal = self.gate.check(request.headers.get("authorization"), route)
            logs.REQUEST_ID.set(rid)
            logs.REQUEST_FIELDS.set({"principal": principal, "door": "http"})
            self.in_flight.started()
            try:
                if self.in_flight.closing:
                    raise NotReady("the server is shutting down")
                if refusal is not None:
                    raise Unauthorized(refusal[1].replace("metadata", "header"))
                response = await handler(request)
            except Exception as exc:
                response = _error_response(exc)
            response.headers["x-request-id"] = rid
            if isinstance(response, EventStream):
                response.on_close = lambda status: self._done(route, status, t0)
            else:
                self._done(route, response.status_code, t0)
            return response

        return door

    def _done(self, route: str, status: int, t0: float) -> None:
        self.in_flight.ended()
        self.metrics.http(route, status)
        logs.access(log, route, str(status), t0)

    async def _body(self, request: Request) -> Any:
        limit = self.limits.max_message_bytes
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            raise PayloadTooLarge(f"body: {size} bytes is over the limit max_message_bytes={limit}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise PayloadTooLarge(f"body: over the limit max_message_bytes={limit}")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest("body", f"not valid JSON: {exc}") from None

    # -- generation ------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        req = schema.parse(body, "completion", max_top_logprobs=self.limits.max_top_n)
        rid, created = logs.REQUEST_ID.get() or "", int(time.time())
        if req.stream:
            run = await self._start(req, req.prompts[0])
            outcome = Outcome()
            sse = self._completion_events(req, run, rid, created, outcome)
            return EventStream(sse, outcome, _model_headers(run.model))
        runs = await self._gone_or(request, self._complete_all(req, rid, created))
        return JSONResponse(runs[1], headers=_model_headers(runs[0]))

    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request)
        req = schema.parse(body, "chat", max_top_logprobs=self.limits.max_top_n)
        rid, created = logs.REQUEST_ID.get() or "", int(time.time())
        run = await self._start(req, None)
        if req.stream:
            outcome = Outcome()
            sse = self._chat_events(req, run, rid, created, outcome)
            return EventStream(sse, outcome, _model_headers(run.model))
        chat = await self._gone_or(request, self._chat(req, run, rid, created))
        return JSONResponse(chat, headers=_model_headers(run.model))

    async def _start(self, req: schema.OpenAIRequest, prompt: schema.Prompt | None) -> Run:
        """Resolve the model, build the engine request off the loop, submit. A swap can
        retire the version in between; then the request goes to the one now serving."""
        if not req.generate:  # an echo that generates nothing: built, never submitted
            model = self.models.get(req.name, req.ref)
            logs.annotate(model=model.ref)
            return Run(model, await asyncio.to_thread(self._build, req, prompt, model))
        model, greq, handle, queue = await self.generation.submit(
            req.name, req.ref, lambda m: self._build(req, prompt, m)
        )
        return Run(model, greq, queue, handle)

    def _build(
        self, req: schema.OpenAIRequest, prompt: schema.Prompt | None, model: LoadedModel
    ) -> GenerationRequest:
        pb = req.template if prompt is None else req.with_prompt(prompt)
        rid = logs.REQUEST_ID.get() or ""
        try:
            ids = None
            if prompt is not None and prompt.ids is not None:
                ids = _token_prompt(prompt.ids, model, self.limits)
            return convert.generation_request(pb, model, self.limits, rid, None, ids=ids)
        except InvalidRequest as exc:
            raise schema.renamed(exc, req.kind) from None

    async def _events(self, run: Run, route: str) -> AsyncGenerator[Event, None]:
        assert run.queue is not None  # only runs that generate are read
        t0 = time.monotonic()
        async for ev in self.generation.events(run.model, run.queue, route, t0):
            yield ev

    async def _gone_or(self, request: Request, work: Awaitable[T]) -> T:
        """`work`'s result, or ClientGone (work cancelled) once the client disconnects."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise ClientGone("the client closed the connection")
        finally:
            for t in (task, gone):
                t.cancel()

    # -- completions -----------------------------------------------------------------

    async def _complete_all(
        self, req: schema.OpenAIRequest, rid: str, created: int
    ) -> tuple[LoadedModel, dict[str, Any]]:
        runs: list[Run] = []
        try:
            for prompt in req.prompts:
                runs.append(await self._start(req, prompt))
            results = await asyncio.gather(*(self._complete(req, r, i) for i, r in enumerate(runs)))
        finally:
            for run in runs:
                run.cancel()
        choices = [choice for choice, _, _ in results]
        use = out.usage(sum(p for _, p, _ in results), sum(g for _, _, g in results))
        return runs[0].model, out.completion(rid, runs[0].model.ref, created, choices, use)

    async def _complete(
        self, req: schema.OpenAIRequest, run: Run, index: int
    ) -> tuple[dict[str, Any], int, int]:
        """(choice, prompt tokens, generated tokens) of one prompt."""
        prompt = run.request.prompt_ids
        echoed = None  # scored beside the generation, not before it
        if req.echo and req.logprobs:
            echoed = asyncio.ensure_future(self.echo.logprobs(run.model, prompt, req.top_logprobs))
        try:
            events = [e async for e in self._events(run, "/v1/completions")] if run.handle else []
            scored = await echoed if echoed is not None else []
        finally:
            if echoed is not None:
                echoed.cancel()
        finish = events[-1].finish if events else None
        text = "".join(e.text for e in events)
        generated = [out.Scored.generated(lp) for e in events for lp in e.logprobs]

        def render() -> dict[str, Any]:
            prefix = run.model.tokenizer.decode(list(prompt)) if req.echo else ""
            logprobs = None
            if req.logprobs:
                logprobs = out.completion_logprobs(run.model.tokenizer, [*scored, *generated], 0)
            reason = out.FINISH_REASONS[finish.reason] if finish else "length"
            return out.completion_choice(index, prefix + text, logprobs, reason)

        choice = await asyncio.to_thread(render)
        return choice, len(prompt), finish.generated_tokens if finish else 0

    async def _completion_events(
        self, req: schema.OpenAIRequest, run: Run, rid: str, created: int, outcome: Outcome
    ) -> AsyncGenerator[str, None]:
        tok, ref = run.model.tokenizer, run.model.ref
        offset = 0

        def chunk(text: str, scored: list[out.Scored], finish: str | None) -> str:
            nonlocal offset
            lps = out.completion_logprobs(tok, scored, offset) if req.logprobs else None
            offset += len(text)
            choice = out.completion_choice(0, text, lps, finish)
            return event(out.completion(rid, ref, created, [choice], None))

        generated = 0
        try:
            if req.echo:
                prompt = run.request.prompt_ids
                scored = (
                    await self.echo.logprobs(run.model, prompt, req.top_logprobs)
                    if req.logprobs
                    else []
                )
                text = await asyncio.to_thread(tok.decode, list(prompt))
                yield chunk(text, scored, None if run.handle else "length")
            if run.handle is not None:
                async for ev in self._events(run, "/v1/completions"):
                    reason = out.FINISH_REASONS[ev.finish.reason] if ev.finish else None
                    if ev.finish is not None:
                        generated = ev.finish.generated_tokens
                    scored = [out.Scored.generated(lp) for lp in ev.logprobs]
                    if ev.text or scored or reason:
                        yield chunk(ev.text, scored, reason)
            if req.include_usage:
                use = out.usage(len(run.request.prompt_ids), generated)
                yield event(out.completion(rid, ref, created, [], use))
            yield DONE
        except Exception as exc:
            yield _error_event(exc, outcome)
        finally:
            run.cancel()

    # -- chat ------------------------------------------------------------------------

    async def _chat(
        self, req: schema.OpenAIRequest, run: Run, rid: str, created: int
    ) -> dict[str, Any]:
        try:
            events = [e async for e in self._events(run, "/v1/chat/completions")]
        finally:
            run.cancel()
        finish = events[-1].finish
        assert finish is not None  # _events ends at the finish or raises
        scored = [out.Scored.generated(lp) for e in events for lp in e.logprobs]
        tok = run.model.tokenizer
        lps = await asyncio.to_thread(out.chat_logprobs, tok, scored) if req.logprobs else None
        use = out.usage(finish.input_tokens, finish.generated_tokens)
        text = "".join(e.text for e in events)
        reason = out.FINISH_REASONS[finish.reason]
        return out.chat(
            rid, run.model.ref, created, text=text, logprobs=lps, finish=reason, use=use
        )

    async def _chat_events(
        self, req: schema.OpenAIRequest, run: Run, rid: str, created: int, outcome: Outcome
    ) -> AsyncGenerator[str, None]:
        tok, ref = run.model.tokenizer, run.model.ref
        try:
            yield event(out.chat_chunk(rid, ref, created, {"role": "assistant", "content": ""}))
            async for ev in self._events(run, "/v1/chat/completions"):
                scored = [out.Scored.generated(lp) for lp in ev.logprobs]
                lps = out.chat_logprobs(tok, scored) if req.logprobs and scored else None
                if ev.text or lps:
                    yield event(
                        out.chat_chunk(rid, ref, created, {"content": ev.text}, logprobs=lps)
                    )
                if ev.finish is not None:
                    reason = out.FINISH_REASONS[ev.finish.reason]
                    yield event(out.chat_chunk(rid, ref, created, {}, finish=reason))
                    if req.include_usage:
                        use = out.usage(ev.finish.input_tokens, ev.finish.generated_tokens)
                        yield event({**out.chat_chunk(rid, ref, created, None), "usage": use})
            yield DONE
        except Exception as exc:
            yield _error_event(exc, outcome)
        finally:
            run.cancel()

    # -- models and health -----------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        cards = [await asyncio.to_thread(self._card, m) for m in self.models.all()]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(self, request: Request) -> Response:
        model = self.models.get(*schema.model_ref(request.path_params["model"]))
        return JSONResponse(await asyncio.to_thread(self._card, model))

    def _card(self, model: LoadedModel) -> dict[str, Any]:
        """A model object; `id` is the name (`model` in a request), `root` the version."""
        return {
            "id": model.name,
            "object": "model",
            "created": int(model.loaded_at),
            "owned_by": "slimserve",
            "root": model.ref,
            "digest": model.artifact.digest,
            "aliases": self.models.registry.aliases_of(model.name, model.artifact.version),
            "max_model_len": model.max_context,
        }

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def is_ready(self, request: Request) -> Response:
        if await self.ready():
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)


def _model_headers(model: LoadedModel) -> dict[str, str]:
    return {"x-slimserve-model": model.ref, "x-slimserve-model-digest": model.artifact.digest}


def _token_prompt(ids: tuple[int, ...], model: LoadedModel, limits: Any) -> tuple[int, ...]:
    vocab = model.backend.vocab_size
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise InvalidRequest(f"prompt[{i}]", f"token id {t} is outside 0..{vocab - 1}")
    return convert.checked_prompt(ids, "prompt", model, limits)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_response(exc: BaseException) -> Response:
    status, body = error_body(exc)
    headers = {"retry-after": str(status.retry_after_s)} if status.retry_after_s else None
    return JSONResponse(body, status_code=status.http, headers=headers)


def _error_event(exc: BaseException, outcome: Outcome) -> str:
    """An error after the stream began: an `{"error": ...}` event (the SDKs raise it)."""
    status, body = error_body(exc)
    outcome.status = status.http
    return event(body)
