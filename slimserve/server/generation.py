"""The door-neutral generation layer: one request path for every door.

Each door (gRPC, OpenAI HTTP, KServe) parses its own wire format into a spec of this module
(`GenerateSpec`, `ScoreSpec`, `TokenizeSpec`: plain values, no protobuf), then calls
`Generation`: `start` validates the spec against the limits and the model (`validate`, the
one place every field's rule lives), submits it to the model's engine and waits until the
engine has tokenized and accepted it (so a prompt that does not fit is an error of the call,
never a stream that fails after its first message); `events` reads the engine's events
and records the metrics every door shares; `score` and `tokenize` answer whole. A
validation error is an `InvalidRequest` naming the field in the neutral vocabulary below,
which each door renders in its own words (`errors.rename`):

    prompt, prompt.text, prompt.messages[i].role, prompt.ids[i]   the input
    temperature, top_p, top_k, seed, repetition_penalty           sampling
    max_new_tokens, stop[i], time_limit, ignore_eos              stopping
    logprobs, top_n, echo, n, guided                              the response
    labels[i]                                                     Score
    model                                                         which model

No door constructs or calls another door's class; a door renders events and errors only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec

from slimserve.engine.errors import DeadlineExpired, EngineFailure, InvalidRequest, NotReady
from slimserve.engine.loader import HandleLike, LoadedModel
from slimserve.engine.manager import ModelManager
from slimserve.engine.types import (
    GUIDED_KINDS,
    Accepted,
    Event,
    Finish,
    GenerationRequest,
    Guided,
    Prompt,
    SamplingParams,
    ScoreRequest,
    StopParams,
    StopReason,
    TokenizeResult,
    TokenLogprob,
)
from slimserve.server import logs
from slimserve.server.config import Limits
from slimserve.server.metrics import Metrics

#: Softmax temperatures below this overflow float32 logits (inf -> NaN probabilities).
MIN_TEMPERATURE = 1e-3
#: Repetition penalties outside this range overflow penalised logits the same way.
PENALTY_RANGE = (1e-2, 1e2)
_ROLES = frozenset({"system", "user", "assistant"})
_UINT32 = 2**32 - 1


# ---- specs: what a door parsed ------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingSpec:
    """Sampling as the caller asked, each door's defaults already applied: `greedy`, or
    sampling at `temperature` (None: 1.0); None and 0 elsewhere mean "off"."""

    greedy: bool = True
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateSpec:
    """A generation as any door sends it (module docstring)."""

    #: The model's name ("" = the server's default) and a version or alias ("" = loaded).
    model: str = ""
    ref: str = ""
    prompt: Prompt
    sampling: SamplingSpec = SamplingSpec()
    #: None: the server's default (`Limits.default_max_new_tokens`).
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    time_limit_s: float | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    top_n: int = 0
    guided: Guided | None = None
    #: Independent completions of the prompt (each its own sequence).
    n: int = 1
    #: The first event carries the prompt's text (OpenAI's `echo`).
    echo: bool = False
    #: Seconds the caller will wait (its deadline), None = none.
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreSpec:
    model: str = ""
    ref: str = ""
    prompt: Prompt
    labels: tuple[str, ...]
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenizeSpec:
    model: str = ""
    ref: str = ""
    prompt: Prompt
    tokens: bool = False


# ---- validation: every rule, once -------------------------------------------------------
def prompt_limit(model: LoadedModel, limits: Limits) -> int:
    """The most tokens a prompt may have: `max_prompt_tokens`, and one short of the
    model's context."""
    return min(limits.max_prompt_tokens, model.max_context - 1)


def utf8_size(field: str, text: str) -> int:
    """`text`'s size in UTF-8 bytes; a lone surrogate (JSON's "\\ud800") is refused by name
    rather than failing later, where the text is encoded."""
    try:
        return len(text.encode())
    except UnicodeEncodeError as exc:
        raise InvalidRequest(field, f"is not valid Unicode: {exc.reason} at {exc.start}") from None


def check_prompt(prompt: Prompt, model: LoadedModel, limits: Limits) -> None:
    """Refuse an input that is absent, empty or malformed, or text longer than the prompt
    limit can hold: no token of the model's vocabulary stands for more than
    `model.max_token_bytes`, so that is refused here before it is tokenized (or sent)."""
    given = [x for x in (prompt.text, prompt.messages, prompt.ids) if x is not None]
    if len(given) != 1:
        raise InvalidRequest("prompt", "set exactly one of text, messages or token ids")
    if prompt.text is not None:
        if not prompt.text.strip():
            raise InvalidRequest("prompt.text", "the prompt must not be empty")
        _check_bytes(utf8_size("prompt.text", prompt.text), "prompt.text", model, limits)
    elif prompt.messages is not None:
        if not prompt.messages:
            raise InvalidRequest("prompt.messages", "at least one message is required")
        for i, m in enumerate(prompt.messages):
            if m.role not in _ROLES:
                raise InvalidRequest(
                    f"prompt.messages[{i}].role",
                    f"must be system, user or assistant, got {m.role!r}",
                )
        if not any(m.content.strip() for m in prompt.messages):
            raise InvalidRequest("prompt.messages", "every message is empty")
        size = sum(
            utf8_size(f"prompt.messages[{i}].content", m.content)
            for i, m in enumerate(prompt.messages)
        )
        _check_bytes(size, "prompt.messages", model, limits)
        if not model.info.has_chat_template:
            raise InvalidRequest(
                "prompt.messages", "this model has no chat template; send text instead"
            )
    elif not prompt.ids:
        raise InvalidRequest("prompt.ids", "at least one token id is required")
    else:
        vocab = model.backend.vocab_size
        for i, t in enumerate(prompt.ids):
            if not 0 <= t < vocab:
                raise InvalidRequest(f"prompt.ids[{i}]", f"token id {t} is outside 0..{vocab - 1}")


def _check_bytes(size: int, field: str, model: LoadedModel, limits: Limits) -> None:
    limit = prompt_limit(model, limits)
    most = limit * model.max_token_bytes
    if most and size > most:
        raise InvalidRequest(
            field,
            f"the prompt is {size} bytes; {limit} tokens (the prompt limit: "
            f"max_prompt_tokens={limits.max_prompt_tokens}, context={model.max_context}) "
            f"hold at most {most} bytes of text for this model",
        )


def _finite(field: str, value: float | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of 400 digits
        raise InvalidRequest(field, "is too large a number") from None
    if not math.isfinite(number):
        raise InvalidRequest(field, f"must be a finite number, got {number}")
    return number


def sampling_params(s: SamplingSpec) -> SamplingParams:
    temperature = _finite("temperature", s.temperature)
    if temperature is not None and not s.greedy and temperature < MIN_TEMPERATURE:
        raise InvalidRequest("temperature", f"must be >= {MIN_TEMPERATURE}, got {temperature}")
    if temperature is not None and temperature < 0:
        raise InvalidRequest("temperature", f"must be >= 0, got {temperature}")
    top_p = _finite("top_p", s.top_p)
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p}")
    if not 0 <= s.top_k <= _UINT32:
        raise InvalidRequest("top_k", f"must be 0 (off) or a positive count, got {s.top_k}")
    if s.seed is not None and not 0 <= s.seed < 2**64:
        raise InvalidRequest("seed", f"must be in 0..2^64-1, got {s.seed}")
    penalty = _finite("repetition_penalty", s.repetition_penalty)
    low, high = PENALTY_RANGE
    if penalty is not None and not low <= penalty <= high:
        raise InvalidRequest("repetition_penalty", f"must be in [{low}, {high}], got {penalty}")
    return SamplingParams(
        do_sample=not s.greedy,
        temperature=temperature or 1.0,
        top_k=s.top_k,
        top_p=top_p or 1.0,
        seed=s.seed,
        repetition_penalty=penalty or 1.0,
    )


def stop_params(spec: GenerateSpec, limits: Limits) -> StopParams:
    n = limits.default_max_new_tokens if spec.max_new_tokens is None else spec.max_new_tokens
    if not 1 <= n <= limits.max_new_tokens:
        raise InvalidRequest(
            "max_new_tokens", f"must be 1..{limits.max_new_tokens} (limit max_new_tokens), got {n}"
        )
    if len(spec.stop) > limits.max_stop_sequences:
        raise InvalidRequest(
            "stop",
            f"at most {limits.max_stop_sequences} (limit max_stop_sequences), got {len(spec.stop)}",
        )
    for i, s in enumerate(spec.stop):
        if not s:
            raise InvalidRequest(f"stop[{i}]", "must not be empty")
        utf8_size(f"stop[{i}]", s)
        if len(s) > limits.max_stop_sequence_chars:
            raise InvalidRequest(
                f"stop[{i}]",
                f"{len(s)} characters is over the limit "
                f"max_stop_sequence_chars={limits.max_stop_sequence_chars}",
            )
    limit = _finite("time_limit", spec.time_limit_s)
    if limit is not None and limit <= 0:
        raise InvalidRequest("time_limit", f"must be > 0, got {limit}")
    return StopParams(
        max_new_tokens=n, stop_sequences=spec.stop, time_limit_s=limit, ignore_eos=spec.ignore_eos
    )


def check_guided(guided: Guided | None) -> None:
    """The shape of a structured-output request (whether it compiles for the model is the
    engine's answer, which is an INVALID_ARGUMENT too: never free text instead)."""
    if guided is None:
        return
    utf8_size("guided", guided.spec)
    for choice in guided.choices:
        utf8_size("guided", choice)
    if guided.kind not in GUIDED_KINDS:
        raise InvalidRequest("guided", f"must be one of {', '.join(GUIDED_KINDS)}")
    if guided.kind == "choice":
        if not guided.choices or not all(guided.choices):
            raise InvalidRequest("guided", "a choice needs one or more non-empty strings")
    elif guided.kind == "json_schema":
        try:
            schema = json.loads(guided.spec)
        except ValueError as exc:
            raise InvalidRequest("guided", f"the JSON schema is not JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise InvalidRequest("guided", "the JSON schema must be an object")
    elif guided.kind in ("regex", "grammar") and not guided.spec:
        raise InvalidRequest("guided", f"the {guided.kind} must not be empty")


def validate(
    spec: GenerateSpec, model: LoadedModel, limits: Limits, request_id: str
) -> GenerationRequest:
    """The engine request `spec` describes, every field checked (module docstring)."""
    check_prompt(spec.prompt, model, limits)
    sampling = sampling_params(spec.sampling)
    stopping = stop_params(spec, limits)
    top_n_limit = min(limits.max_top_n, model.backend.vocab_size)
    if not 0 <= spec.top_n <= top_n_limit:
        raise InvalidRequest(
            "top_n", f"must be 0..{top_n_limit} (limit max_top_n), got {spec.top_n}"
        )
    if not 1 <= spec.n <= limits.max_n:
        raise InvalidRequest("n", f"must be 1..{limits.max_n} (limit max_n), got {spec.n}")
    check_guided(spec.guided)
    timeout = _finite("timeout", spec.timeout_s)
    return GenerationRequest(
        request_id=request_id,
        prompt=spec.prompt,
        sampling=sampling,
        stopping=stopping,
        logprobs=spec.logprobs or spec.top_n > 0,
        top_n=spec.top_n,
        deadline=time.monotonic() + timeout if timeout is not None else None,
        prompt_limit=prompt_limit(model, limits),
        echo=spec.echo,
        guided=spec.guided,
    )


def check_labels(labels: tuple[str, ...], model: LoadedModel, limits: Limits) -> None:
    if not labels:
        raise InvalidRequest("labels", "at least one label is required")
    if len(labels) > limits.max_labels:
        raise InvalidRequest(
            "labels", f"at most {limits.max_labels} (limit max_labels), got {len(labels)}"
        )
    for i, label in enumerate(labels):
        if not label:
            raise InvalidRequest(f"labels[{i}]", "must be a non-empty string")
        _check_bytes(utf8_size(f"labels[{i}]", label), f"labels[{i}]", model, limits)


# ---- runs ---------------------------------------------------------------------------------
class EventQueue:
    """Carries engine events (an engine thread) to the request's handler (event loop)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:  # called on an engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self) -> Event:
        return await self._queue.get()


@dataclass(slots=True)
class Run:
    """One sequence on its way through the engine."""

    model: LoadedModel
    request: GenerationRequest
    handle: HandleLike
    queue: EventQueue
    accepted: Accepted
    #: Which of the request's `n` completions this is.
    index: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    #: The door's parse phase, ms (the call's start to its submission; 0: unknown) ...
    parse_ms: float = 0.0
    #: ... and time.monotonic() at the submission.
    submitted: float = 0.0

    def cancel(self) -> None:
        self.handle.cancel()  # no-op once finished; frees the slot otherwise


@dataclass(frozen=True, slots=True)
class LabelScore:
    label: str
    logprob: float
    #: Normalised over the labels given (they sum to 1).
    probability: float
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Scored:
    model: LoadedModel
    input_tokens: int
    labels: tuple[LabelScore, ...]
    seconds: float


class Generation:
    """Submits validated requests to the models' engines and reads their answers."""

    def __init__(self, models: ModelManager, limits: Limits, metrics: Metrics) -> None:
        self.models = models
        self.limits = limits
        self.metrics = metrics

    def model(self, name: str, ref: str) -> LoadedModel:
        model = self.models.get(name, ref)
        logs.annotate(model=model.ref)
        return model

    async def start(self, spec: GenerateSpec, request_id: str) -> list[Run]:
        """Validate, submit `spec.n` sequences, and wait until the engine accepted them.

        A swap can retire the version between resolving and submitting; the request then
        goes to the version now serving (once).

        Raises:
            InvalidRequest, UnknownModel, Overloaded, NotReady: the request is refused.
        """
        for attempt in range(2):
            model = self.model(spec.model, spec.ref)
            req = validate(spec, model, self.limits, request_id)
            try:
                return await self._submit_all(model, req, spec.n)
            except NotReady:
                if attempt or self.models.get(spec.model, spec.ref) is model:
                    raise
        raise AssertionError("unreachable")

    async def _submit_all(self, model: LoadedModel, req: GenerationRequest, n: int) -> list[Run]:
        runs: list[Run] = []
        try:
            for i in range(n):
                one = req if i == 0 else _nth(req, i)
                runs.append(await self._submit(model, one, i))
        except BaseException:
            for run in runs:
                run.cancel()
            raise
        return runs

    async def _submit(self, model: LoadedModel, req: GenerationRequest, index: int) -> Run:
        queue = EventQueue()
        submitted = time.monotonic()
        t0 = logs.REQUEST_T0.get()
        parse_ms = (submitted - t0) * 1e3 if t0 is not None else 0.0
        handle = model.engine.submit(req, queue.put)
        try:
            first = await queue.get()
        except BaseException:
            handle.cancel()
            raise
        if first.error is not None:
            raise first.error
        if first.accepted is None:  # an engine always says it accepted first
            raise EngineFailure(f"{model.ref}: the engine answered before accepting")
        return Run(
            model, req, handle, queue, first.accepted, index, parse_ms=parse_ms, submitted=submitted
        )

    async def events(self, run: Run, method: str) -> AsyncIterator[Event]:
        """A run's events until its finish; records token gaps and the finished request.

        Raises the engine's error for the request, and DeadlineExpired when the engine
        stopped it because its deadline passed: the caller must not get an OK answer for a
        truncated generation.
        """
        last_token = first_token = render_s = 0.0
        while True:
            event = await run.queue.get()
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
                    self.metrics.token_gap(run.model, now - last_token)
                last_token = now
                first_token = first_token or now
            if f is not None:
                f = _with_phases(f, run, first_token, render_s)
                event = msgspec.structs.replace(event, finish=f)
                self.metrics.finished(run.model, f, method, time.monotonic() - run.started)
                logs.annotate(
                    stop_reason=f.reason.value,
                    input_tokens=f.input_tokens,
                    generated_tokens=f.generated_tokens,
                )
            handed = time.perf_counter()
            yield event
            render_s += time.perf_counter() - handed  # the door renders and writes it
            if f is not None:
                return

    async def collect(self, run: Run, method: str) -> list[Event]:
        """Every event of a run, its finish last (a unary answer)."""
        try:
            return [e async for e in self.events(run, method)]
        finally:
            run.cancel()

    async def score(self, spec: ScoreSpec, request_id: str) -> Scored:
        """Each label's log-probability after the prompt, and its probability among them."""
        t0 = time.monotonic()
        model = self.model(spec.model, spec.ref)
        check_prompt(spec.prompt, model, self.limits)
        check_labels(spec.labels, model, self.limits)
        timeout = _finite("timeout", spec.timeout_s)
        req = ScoreRequest(
            request_id=request_id,
            prompt=spec.prompt,
            labels=spec.labels,
            deadline=time.monotonic() + timeout if timeout is not None else None,
            prompt_limit=prompt_limit(model, self.limits),
        )
        try:
            result = await asyncio.wrap_future(model.engine.score(req))
        except EngineFailure as exc:  # e.g. a non-finite score: say which model gave it
            raise EngineFailure(f"{model.ref}: {exc}") from exc
        logps = result.logprobs
        top = max(logps)
        norm = math.log(sum(math.exp(lp - top) for lp in logps)) + top
        seconds = time.monotonic() - t0
        self.metrics.scored(model, result.input_tokens, seconds)
        labels = tuple(
            LabelScore(label, lp, math.exp(lp - norm), n)
            for label, lp, n in zip(spec.labels, logps, result.label_tokens, strict=True)
        )
        return Scored(model, result.input_tokens, labels, seconds)

    async def tokenize(self, spec: TokenizeSpec) -> tuple[LoadedModel, TokenizeResult]:
        model = self.model(spec.model, spec.ref)
        check_prompt(spec.prompt, model, self.limits)
        limit = prompt_limit(model, self.limits)
        fut = model.engine.tokenize(spec.prompt, limit, tokens=spec.tokens)
        return model, await asyncio.wrap_future(fut)

    async def prompt_logprobs(
        self, model: LoadedModel, prompt: Prompt, top_n: int, deadline: float | None = None
    ) -> list[TokenLogprob]:
        """An echo's log-probabilities: each prompt token's given the ones before (None for
        the first, which has no context), with its position's `top_n` alternatives.

        Raises:
            InvalidRequest: naming `echo`, when the prompt is longer than the Score budget
                (`max_score_tokens`) or the context.
        """
        limit = min(model.info.max_score_tokens or model.max_context, model.max_context - 1)
        fut = model.engine.prompt_logprobs(prompt, top_n, deadline, limit)
        try:
            return await asyncio.wrap_future(fut)
        except InvalidRequest as exc:
            if exc.field != "prompt":
                raise
            raise InvalidRequest(
                "echo",
                f"log-probabilities of the prompt are limited to {limit} tokens "
                "(max_score_tokens and the context): send a shorter prompt, or echo without "
                f"logprobs ({exc.reason})",
            ) from None


def _with_phases(f: Finish, run: Run, first_token: float, render_s: float) -> Finish:
    """`f` with the phases the door saw: its parse, the engine process's template and
    tokenize (from the accepted event), the first token's hops and the rendering."""
    t = f.timings
    hops = 0.0
    if first_token and run.submitted:
        engine = run.accepted.template_ms + run.accepted.tokenize_ms + t.ttft_ms
        hops = max(0.0, (first_token - run.submitted) * 1e3 - engine)
    timings = msgspec.structs.replace(
        t,
        parse_ms=run.parse_ms,
        template_ms=run.accepted.template_ms,
        tokenize_ms=run.accepted.tokenize_ms,
        first_token_out_ms=hops,
        render_ms=render_s * 1e3,
    )
    return msgspec.structs.replace(f, timings=timings)


def _nth(req: GenerationRequest, i: int) -> GenerationRequest:
    """The `i`-th of `n` completions: its own id and, when seeded, its own seed (so the
    completions differ yet each is reproducible)."""
    s = req.sampling
    seed = None if s.seed is None else (s.seed + i) % 2**64
    return req.replace(request_id=f"{req.request_id}-{i}", sampling=s.replace(seed=seed))
