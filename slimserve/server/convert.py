"""The gRPC door's wire: `slimserve.v1` protobuf to the door-neutral specs
(`server.generation`) and engine events back to protobuf.

Only the protobuf's shape is read here (which input is set, the gRPC defaults: `do_sample`
false is greedy, 0 is "unset" for temperature, top_p and repetition_penalty); every rule a
value must meet is `generation.validate`'s, and a refusal names the neutral field, which
`FIELDS` renders in this door's words.
"""

from __future__ import annotations

import math
from typing import Any

from slimserve.engine.errors import InvalidRequest
from slimserve.engine.loader import LoadedModel
from slimserve.engine.types import (
    EngineStats,
    Event,
    Finish,
    Guided,
    Message,
    Prompt,
    StopReason,
    TokenLogprob,
)
from slimserve.server.generation import GenerateSpec, SamplingSpec, ScoreSpec, TokenizeSpec
from slimserve.v1 import generation_pb2 as gen_pb
from slimserve.v1 import models_pb2 as models_pb

# DEADLINE never reaches a response: the servicer answers DEADLINE_EXCEEDED instead.
_STOP_REASONS: dict[StopReason, Any] = {
    r: gen_pb.StopReason.Value(r.value) for r in StopReason if r is not StopReason.DEADLINE
}

#: Neutral field names (`server.generation`) in this door's words.
FIELDS = {
    "prompt": "input",
    "prompt.text": "text",
    "prompt.messages": "chat.messages",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "top_k": "sampling.top_k",
    "seed": "sampling.seed",
    "repetition_penalty": "sampling.repetition_penalty",
    "max_new_tokens": "stopping.max_new_tokens",
    "stop": "stopping.stop_sequences",
    "time_limit": "stopping.time_limit_ms",
    "top_n": "response.top_n",
    "logprobs": "response.logprobs",
}


def fields_of(msg: Any) -> dict[str, str]:
    """`FIELDS` for one request: the prompt named as the input it set (`text`, `chat`)."""
    which = msg.WhichOneof("input") if msg is not None else None
    return {**FIELDS, "prompt": which or "input"}


def prompt_of(msg: Any) -> Prompt:
    """A request's `text` or `chat` input."""
    which = msg.WhichOneof("input")
    if which == "text":
        return Prompt(text=msg.text)
    if which == "chat":
        return Prompt(messages=tuple(Message(m.role, m.content) for m in msg.chat.messages))
    raise InvalidRequest("prompt", "set either text or chat")


def guided_of(pb: Any) -> Guided | None:
    which = pb.WhichOneof("kind")
    if which is None:
        return None
    if which == "json_object":
        return Guided("json_object") if pb.json_object else None
    if which == "choice":
        return Guided("choice", choices=tuple(pb.choice.choices))
    return Guided(which, getattr(pb, which))


def generate_spec(pb: Any, timeout_s: float | None) -> GenerateSpec:
    s, st = pb.sampling, pb.stopping
    return GenerateSpec(
        model=pb.model.name,
        ref=pb.model.ref,
        prompt=prompt_of(pb),
        sampling=SamplingSpec(
            greedy=not s.do_sample,
            temperature=s.temperature or None,
            top_k=s.top_k,
            top_p=s.top_p or None,
            seed=s.seed if s.HasField("seed") else None,
            repetition_penalty=s.repetition_penalty or None,
        ),
        max_new_tokens=st.max_new_tokens or None,
        stop=tuple(st.stop_sequences),
        time_limit_s=st.time_limit_ms / 1e3 if st.time_limit_ms else None,
        ignore_eos=st.ignore_eos,
        logprobs=pb.response.logprobs,
        top_n=pb.response.top_n,
        guided=guided_of(pb.guided) if pb.HasField("guided") else None,
        timeout_s=timeout_s,
    )


def score_spec(pb: Any, timeout_s: float | None) -> ScoreSpec:
    return ScoreSpec(
        model=pb.model.name,
        ref=pb.model.ref,
        prompt=prompt_of(pb),
        labels=tuple(pb.labels),
        timeout_s=timeout_s,
    )


def tokenize_spec(pb: Any) -> TokenizeSpec:
    return TokenizeSpec(
        model=pb.model.name, ref=pb.model.ref, prompt=prompt_of(pb), tokens=pb.return_tokens
    )


def _token_infos(lps: tuple[TokenLogprob, ...]) -> list[Any]:
    out = []
    for lp in lps:
        top = [
            gen_pb.TopToken(token_id=t, text=text, logprob=v)
            for (t, v), text in zip(lp.top, lp.top_text, strict=True)
        ]
        logprob = lp.logprob if lp.logprob is not None else 0.0  # generated: always set
        out.append(gen_pb.TokenInfo(token_id=lp.token_id, logprob=logprob, top=top))
    return out


def fill_finish(msg: Any, finish: Finish) -> None:
    msg.stop_reason = _STOP_REASONS[finish.reason]
    msg.stop_sequence = finish.stop_sequence
    msg.usage.input_tokens = finish.input_tokens
    msg.usage.generated_tokens = finish.generated_tokens
    msg.usage.cached_tokens = finish.cached_tokens
    t = finish.timings
    msg.timings.queue_ms = t.queue_ms
    msg.timings.prefill_ms = t.prefill_ms
    msg.timings.ttft_ms = t.ttft_ms
    msg.timings.decode_ms = t.decode_ms
    msg.timings.total_ms = t.total_ms
    msg.timings.draft = t.draft
    msg.timings.draft_proposed = t.draft_proposed
    msg.timings.draft_accepted = t.draft_accepted
    msg.timings.draft_acceptance_rate = t.acceptance_rate
    msg.timings.parse_ms = t.parse_ms
    msg.timings.template_ms = t.template_ms
    msg.timings.tokenize_ms = t.tokenize_ms
    msg.timings.admit_ms = t.admit_ms
    msg.timings.first_token_out_ms = t.first_token_out_ms
    msg.timings.render_ms = t.render_ms


def stream_message(
    event: Event, model: LoadedModel, want_ids: bool
) -> gen_pb.GenerateStreamResponse:
    msg = gen_pb.GenerateStreamResponse(text=event.text)
    if want_ids:
        msg.token_ids.extend(event.token_ids)
    if event.logprobs:
        msg.tokens.extend(_token_infos(event.logprobs))
    if event.finish is not None:
        fill_finish(msg, event.finish)
    return msg


def unary_response(
    events: list[Event], model: LoadedModel, request_id: str, want_ids: bool
) -> gen_pb.GenerateResponse:
    msg = gen_pb.GenerateResponse(
        request_id=request_id,
        model=model.ref,
        model_digest=model.artifact.digest,
        text="".join(e.text for e in events),
    )
    if want_ids:
        msg.token_ids.extend(t for e in events for t in e.token_ids)
    lps = tuple(lp for e in events for lp in e.logprobs)
    if lps:
        msg.tokens.extend(_token_infos(lps))
    last = events[-1].finish
    if last is not None:
        fill_finish(msg, last)
    return msg


def model_info(
    model: LoadedModel,
    *,
    is_default: bool,
    aliases: list[str],
    stats: EngineStats | None = None,
) -> models_pb.ModelInfo:
    """`stats` (the engine's, when the caller has them) fill the draft's running counts."""
    m = model.artifact.manifest
    info = model.info
    proposed = stats.draft_proposed if stats is not None else 0
    accepted = stats.draft_accepted if stats is not None else 0
    metrics = {k: float(v) for k, v in m.metrics.items() if _is_number(v)}
    return models_pb.ModelInfo(
        name=model.name,
        version=model.artifact.version,
        aliases=aliases,
        digest=model.artifact.digest,
        parent=m.parent or "",
        source=m.source_uri,
        recipe=m.recipe_name,
        device=model.info.device,
        dtype=model.info.dtype,
        backend=model.backend.name,
        quantization=m.quantization_scheme,
        parameters=m.parameters,
        max_context=model.max_context,
        max_batch=model.backend.max_slots,
        kv_bytes_per_sequence=model.backend.kv_bytes_per_slot(),
        has_chat_template=info.has_chat_template,
        metrics=metrics,
        is_default=is_default,
        state="READY" if model.engine.serving else "RESTARTING",
        plan=info.plan,
        kernels=info.kernels,
        threads=info.threads,
        refused=info.refused,
        measured={k: float(v) for k, v in info.measured.items() if _is_number(v)},
        engine_pid=0 if info.in_process else info.pid,
        engine_restarts=model.engine.restarts,
        draft=info.draft,
        draft_tokens=info.draft_tokens,
        draft_proposed=proposed,
        draft_accepted=accepted,
        draft_acceptance_rate=accepted / proposed if proposed else 0.0,
        torch_threads=info.torch_threads,
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
