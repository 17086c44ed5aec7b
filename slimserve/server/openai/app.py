"""The OpenAI-compatible routes: completions, chat completions, responses, models, health.

Every request goes through `OpenAIApp._door`, the HTTP twin of the gRPC interceptor: the
request id (`x-request-id`, by `logs.request_id_from`), the bearer token (the same `Gate`
and labels as gRPC), the drain count (`InFlight`, shared with gRPC, so a graceful stop
waits for both doors), one access-log line naming the principal, and `Metrics.http`.
Generation goes through the door-neutral layer (`server.generation`): `schema` parses the
body into `GenerateSpec`s, `Generation` validates, submits and reads the engine's events,
and this module only renders them (`responses`, `responses_api`, `stream`). A refusal
names the field the caller sent (`OpenAIRequest.fields`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from slimserve.engine.errors import InvalidRequest, NotReady
from slimserve.engine.loader import LoadedModel
from slimserve.engine.types import Event, Finish, TokenLogprob
from slimserve.server import errors, logs
from slimserve.server.config import ServerConfig
from slimserve.server.generation import GenerateSpec, Generation, Run, TokenizeSpec
from slimserve.server.interceptors import Gate, InFlight
from slimserve.server.openai import responses as out
from slimserve.server.openai import responses_api as api
from slimserve.server.openai import schema
from slimserve.server.openai.errors import ClientGone, PayloadTooLarge, Unauthorized, error_body
from slimserve.server.openai.stream import DONE, EventStream, Outcome, event

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(slots=True)
class Choice:
    """One completion's answer, gathered: text, log-probabilities, how it ended."""

    index: int
    prompt_text: str = ""
    input_tokens: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finish | None = None

    @property
    def generated(self) -> int:
        return self.finish.generated_tokens if self.finish is not None else 0

    @property
    def cached(self) -> int:
        return self.finish.cached_tokens if self.finish is not None else 0

    @property
    def reason(self) -> str:
        return out.FINISH_REASONS[self.finish.reason] if self.finish else "length"


@contextlib.contextmanager
def named(fields: dict[str, str]) -> Iterator[None]:
    """An `InvalidRequest` raised inside names the field as this request sent it."""
    try:
        yield
    except InvalidRequest as exc:
        raise InvalidRequest(errors.rename(exc.field, fields), exc.reason) from None


class OpenAIApp:
    """The HTTP door's handlers over the door-neutral layer."""

    def __init__(
        self,
        generation: Generation,
        config: ServerConfig,
        in_flight: InFlight,
        ready: Callable[[], Awaitable[bool]],
    ) -> None:
        """`ready()` says whether the server as a whole serves (the gRPC health's "")."""
        self.generation = generation
        self.models = generation.models
        self.limits = config.limits
        self.metrics = generation.metrics
        self.in_flight = in_flight
        self.ready = ready
        # Model control never passes this door, so only the token check applies.
        self.gate = Gate(config.auth)

    def app(self) -> Starlette:
        routes = [
            ("/v1/completions", ["POST"], self.completions),
            ("/v1/chat/completions", ["POST"], self.chat_completions),
            ("/v1/responses", ["POST"], self.responses),
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
            logs.REQUEST_T0.set(t0)
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
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise PayloadTooLarge(f"body: over the limit max_message_bytes={limit}")
        except ClientDisconnect:
            raise ClientGone("the client closed the connection mid-body") from None
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest("body", f"not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidRequest("body", "JSON nested too deeply") from None

    async def _parse(self, request: Request, kind: schema.Kind) -> schema.OpenAIRequest:
        return schema.parse(await self._body(request), kind)

    async def _start(self, req: schema.OpenAIRequest, spec: GenerateSpec) -> list[Run]:
        with named(req.fields):
            return await self.generation.start(spec, logs.REQUEST_ID.get() or "")

    async def _events(
        self, req: schema.OpenAIRequest, run: Run, route: str
    ) -> AsyncIterator[Event]:
        with named(req.fields):
            async for ev in self.generation.events(run, route):
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

    async def _gather(self, req: schema.OpenAIRequest, run: Run, route: str) -> Choice:
        """A run's whole answer (its slot is freed however this ends)."""
        choice = Choice(
            run.index,
            run.accepted.prompt_text,
            run.accepted.input_tokens,
        )
        try:
            async for ev in self._events(req, run, route):
                choice.text += ev.text
                choice.logprobs += ev.logprobs
                choice.finish = ev.finish or choice.finish
        finally:
            run.cancel()
        return choice

    # -- completions -----------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        req = await self._parse(request, "completion")
        rid, created = logs.REQUEST_ID.get() or "", int(time.time())
        if req.stream:
            runs = await self._start(req, req.specs[0]) if req.generate else []
            model = runs[0].model if runs else self.generation.model(*_ref(req.specs[0]))
            outcome = Outcome()
            sse = self._completion_events(
                req, model, runs, rid=rid, created=created, outcome=outcome
            )
            return EventStream(sse, outcome, _model_headers(model))
        model, body = await self._gone_or(request, self._complete_all(req, rid, created))
        return JSONResponse(body, headers=_model_headers(model))

    async def _complete_all(
        self, req: schema.OpenAIRequest, rid: str, created: int
    ) -> tuple[LoadedModel, dict[str, Any]]:
        per_prompt: list[list[Run]] = [[] for _ in req.specs]
        try:
            if req.generate:
                for i, spec in enumerate(req.specs):
                    per_prompt[i] = await self._start(req, spec)
            groups = await asyncio.gather(
                *(
                    self._completion(req, spec, runs, i)
                    for i, (spec, runs) in enumerate(zip(req.specs, per_prompt, strict=True))
                )
            )
        finally:
            for run in (r for runs in per_prompt for r in runs):
                run.cancel()
        flat = [c for group in groups for c in group]
        first = per_prompt[0]
        model = first[0].model if first else self.generation.model(*_ref(req.specs[0]))
        use = out.usage(
            sum(group[0][0].input_tokens for group in groups),
            sum(c.generated for c, _ in flat),
            sum(group[0][0].cached for group in groups),
        )
        return model, out.completion(rid, model.ref, created, [b for _, b in flat], use)

    async def _completion(
        self, req: schema.OpenAIRequest, spec: GenerateSpec, runs: list[Run], prompt_index: int
    ) -> list[tuple[Choice, dict[str, Any]]]:
        """The choices of one prompt (`n` of them, or the echo alone), rendered."""
        echoed = await self._echo(req, spec) if req.echo else None
        if not runs:  # max_tokens 0: the echo is the whole answer
            assert echoed is not None
            text, lps, count = echoed
            choice = Choice(prompt_index * spec.n, text, count)
            body = out.completion_choice(
                choice.index,
                text,
                out.completion_logprobs(lps, 0) if req.logprobs else None,
                "length",
            )
            return [(choice, body)]
        gathered = await asyncio.gather(
            *(self._gather(req, run, "/v1/completions") for run in runs)
        )
        rendered = []
        for choice in gathered:
            choice.index = prompt_index * spec.n + choice.index
            prefix, lps = "", list(choice.logprobs)
            if echoed is not None:
                prefix, echo_lps, _ = echoed
                lps = [*echo_lps, *lps]
            logprobs = out.completion_logprobs(lps, 0) if req.logprobs else None
            body = out.completion_choice(
                choice.index, prefix + choice.text, logprobs, choice.reason
            )
            rendered.append((choice, body))
        return rendered

    async def _echo(
        self, req: schema.OpenAIRequest, spec: GenerateSpec
    ) -> tuple[str, list[TokenLogprob], int]:
        """(the prompt's text, its tokens' log-probabilities when asked, its token count)."""
        model = self.generation.model(spec.model, spec.ref)
        with named(req.fields):
            if req.logprobs:
                lps = await self.generation.prompt_logprobs(model, spec.prompt, req.top_logprobs)
                text = "".join(lp.text for lp in lps)
                if spec.prompt.text is not None:
                    text = spec.prompt.text
                return text, lps, len(lps)
            _, tokens = await self.generation.tokenize(
                TokenizeSpec(model=spec.model, ref=spec.ref, prompt=spec.prompt)
            )
            return tokens.text, [], len(tokens.ids)

    async def _completion_events(
        self,
        req: schema.OpenAIRequest,
        model: LoadedModel,
        runs: list[Run],
        *,
        rid: str,
        created: int,
        outcome: Outcome,
    ) -> AsyncGenerator[str, None]:
        ref = model.ref
        offsets = [0] * max(len(runs), 1)

        def chunk(index: int, text: str, scored: list[TokenLogprob], finish: str | None) -> str:
            lps = out.completion_logprobs(scored, offsets[index]) if req.logprobs else None
            offsets[index] += len(text)
            choice = out.completion_choice(index, text, lps, finish)
            return event(out.completion(rid, ref, created, [choice], None))

        try:
            spec = req.specs[0]
            echoed = await self._echo(req, spec) if req.echo else None
            if echoed is not None:
                text, lps, _ = echoed
                for i in range(max(len(runs), 1)):
                    yield chunk(i, text, lps, None if runs else "length")
            generated = cached = 0
            prompt_tokens = runs[0].accepted.input_tokens if runs else 0
            async for index, ev in _merged(
                [self._events(req, run, "/v1/completions") for run in runs]
            ):
                reason = out.FINISH_REASONS[ev.finish.reason] if ev.finish else None
                if ev.finish is not None:
                    generated += ev.finish.generated_tokens
                    if index == 0:
                        cached = ev.finish.cached_tokens
                if ev.text or ev.logprobs or reason:
                    yield chunk(index, ev.text, list(ev.logprobs), reason)
            if req.include_usage:
                use = out.usage(prompt_tokens, generated, cached)
                yield event(out.completion(rid, ref, created, [], use))
            yield DONE
        except Exception as exc:
            yield _error_event(exc, outcome)
        finally:
            for run in runs:
                run.cancel()

    # -- chat ------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        req = await self._parse(request, "chat")
        rid, created = logs.REQUEST_ID.get() or "", int(time.time())
        runs = await self._start(req, req.specs[0])
        model = runs[0].model
        if req.stream:
            outcome = Outcome()
            sse = self._chat_events(req, runs, rid, created, outcome)
            return EventStream(sse, outcome, _model_headers(model))
        body = await self._gone_or(request, self._chat(req, runs, rid, created))
        return JSONResponse(body, headers=_model_headers(model))

    async def _chat(
        self, req: schema.OpenAIRequest, runs: list[Run], rid: str, created: int
    ) -> dict[str, Any]:
        try:
            choices = await asyncio.gather(
                *(self._gather(req, run, "/v1/chat/completions") for run in runs)
            )
        finally:
            for run in runs:
                run.cancel()
        bodies = [
            out.chat_choice(
                c.index,
                c.text,
                out.chat_logprobs(c.logprobs) if req.logprobs else None,
                c.reason,
            )
            for c in choices
        ]
        use = out.usage(
            choices[0].input_tokens, sum(c.generated for c in choices), choices[0].cached
        )
        return out.chat(rid, runs[0].model.ref, created, bodies, use)

    async def _chat_events(
        self,
        req: schema.OpenAIRequest,
        runs: list[Run],
        rid: str,
        created: int,
        outcome: Outcome,
    ) -> AsyncGenerator[str, None]:
        ref = runs[0].model.ref
        generated = cached = 0
        try:
            for run in runs:
                role = {"role": "assistant", "content": ""}
                yield event(out.chat_chunk(rid, ref, created, role, index=run.index))
            async for index, ev in _merged(
                [self._events(req, run, "/v1/chat/completions") for run in runs]
            ):
                lps = out.chat_logprobs(list(ev.logprobs)) if req.logprobs and ev.logprobs else None
                if ev.text or lps:
                    delta = {"content": ev.text}
                    yield event(out.chat_chunk(rid, ref, created, delta, index=index, logprobs=lps))
                if ev.finish is not None:
                    generated += ev.finish.generated_tokens
                    if index == 0:
                        cached = ev.finish.cached_tokens
                    reason = out.FINISH_REASONS[ev.finish.reason]
                    yield event(out.chat_chunk(rid, ref, created, {}, index=index, finish=reason))
            if req.include_usage:
                use = out.usage(runs[0].accepted.input_tokens, generated, cached)
                yield event({**out.chat_chunk(rid, ref, created, None), "usage": use})
            yield DONE
        except Exception as exc:
            yield _error_event(exc, outcome)
        finally:
            for run in runs:
                run.cancel()

    # -- responses -------------------------------------------------------------------

    async def responses(self, request: Request) -> Response:
        body = await self._body(request)
        req = schema.parse(body, "responses")
        if req.specs[0].n != 1:
            raise InvalidRequest("n", "the Responses API makes one output (leave n out)")
        rid, created = logs.REQUEST_ID.get() or "", int(time.time())
        (run,) = await self._start(req, req.specs[0])
        state = api.ResponseState(rid, run.model.ref, created, _echoed_params(body, req))
        if req.stream:
            outcome = Outcome()
            sse = self._response_events(req, run, state, outcome)
            return EventStream(sse, outcome, _model_headers(run.model))
        choice = await self._gone_or(request, self._gather(req, run, "/v1/responses"))
        state.text, state.logprobs = choice.text, choice.logprobs
        return JSONResponse(_final(state, choice), headers=_model_headers(run.model))

    async def _response_events(
        self, req: schema.OpenAIRequest, run: Run, state: api.ResponseState, outcome: Outcome
    ) -> AsyncGenerator[str, None]:
        choice = Choice(0, input_tokens=run.accepted.input_tokens)
        item = {"output_index": 0, "item_id": state.item_id, "content_index": 0}
        try:
            yield event(state.event("response.created", response=state.response("in_progress")))
            yield event(state.event("response.in_progress", response=state.response("in_progress")))
            yield event(
                state.event(
                    "response.output_item.added",
                    output_index=0,
                    item=state.message("in_progress"),
                )
            )
            yield event(state.event("response.content_part.added", **item, part=state.part(False)))
            async for ev in self._events(req, run, "/v1/responses"):
                choice.finish = ev.finish or choice.finish
                if ev.text or ev.logprobs:
                    state.text += ev.text
                    state.logprobs += ev.logprobs
                    lps = [out.token_entry(lp) for lp in ev.logprobs]
                    yield event(
                        state.event(
                            "response.output_text.delta", **item, delta=ev.text, logprobs=lps
                        )
                    )
            done_lps = [out.token_entry(lp) for lp in state.logprobs]
            yield event(
                state.event("response.output_text.done", **item, text=state.text, logprobs=done_lps)
            )
            yield event(state.event("response.content_part.done", **item, part=state.part(True)))
            final = _final(state, choice)
            yield event(
                state.event("response.output_item.done", output_index=0, item=final["output"][0])
            )
            kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
            yield event(state.event(kind, response=final))
        except Exception as exc:
            status, body = error_body(exc)
            outcome.status = status.http
            error = body["error"]
            yield event(
                state.event(
                    "error", code=error["code"], message=error["message"], param=error["param"]
                )
            )
        finally:
            run.cancel()

    # -- models and health -----------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        cards = [self._card(m) for m in self.models.all()]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(self, request: Request) -> Response:
        model = self.models.get(*schema.model_ref(request.path_params["model"]))
        return JSONResponse(self._card(model))

    def _card(self, model: LoadedModel) -> dict[str, Any]:
        """A model object; `id` is what a request names it by (the bare name for the name's
        default version, `name@version` for another served beside it), `root` the version."""
        default = self.models.get(model.name)
        return {
            "id": model.name if default is model else model.ref,
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


def _ref(spec: GenerateSpec) -> tuple[str, str]:
    return spec.model, spec.ref


def _echoed_params(body: dict[str, Any], req: schema.OpenAIRequest) -> dict[str, Any]:
    """The request's settings a Response object repeats back."""
    spec = req.specs[0]
    fmt: dict[str, Any] = {"type": "text"}
    if spec.guided is not None and spec.guided.kind == "json_object":
        fmt = {"type": "json_object"}
    elif spec.guided is not None and spec.guided.kind == "json_schema":
        fmt = {
            "type": "json_schema",
            "name": req.schema_name or "schema",
            "schema": json.loads(spec.guided.spec),
        }
    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "top_logprobs": req.top_logprobs or None,
        "metadata": body.get("metadata") or {},
        "text": {"format": fmt},
        "store": False,
        "truncation": "disabled",
    }


def _final(state: api.ResponseState, choice: Choice) -> dict[str, Any]:
    cut = choice.finish is not None and out.FINISH_REASONS[choice.finish.reason] == "length"
    use = api.usage(choice.input_tokens, choice.generated, choice.cached)
    if cut:
        return state.response("incomplete", usage=use, incomplete="max_output_tokens")
    return state.response("completed", usage=use)


async def _merged(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """(index, event) from several runs' event streams as the events come."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Event]) -> None:
        try:
            async for ev in stream:
                await queue.put((i, ev))
        except Exception as exc:
            await queue.put((i, exc))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def _model_headers(model: LoadedModel) -> dict[str, str]:
    return {"x-slimserve-model": model.ref, "x-slimserve-model-digest": model.artifact.digest}


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
