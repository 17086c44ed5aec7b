"""Requests built from Python values, and responses read into `slimserve.clients.types`.

Pure functions shared by `Client` and `AsyncClient`; imports only `slimserve.v1`, the
health protos and the client's own types.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from grpc_health.v1 import health_pb2

from slimserve.clients.types import (
    ChatMessage,
    Generation,
    LabelScore,
    ModelInfo,
    Sampling,
    ScoreResult,
    StreamChunk,
    Structured,
    Timings,
    TokenLogprob,
)
from slimserve.v1 import generation_pb2 as gen_pb
from slimserve.v1 import models_pb2 as models_pb

Prompt = str | Sequence[ChatMessage]


def model_ref(model: str) -> gen_pb.ModelRef:
    """`NAME[@VERSION|@ALIAS]` as a ModelRef ("" = the server's default model)."""
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
    structured: Structured | None = None,
) -> gen_pb.GenerateRequest:
    s = sampling or Sampling()
    req = gen_pb.GenerateRequest(
        model=model_ref(model),
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
    if structured is not None:
        _fill_guided(req.guided, structured)
    _fill_input(req, prompt)
    return req


def _fill_guided(msg: Any, st: Structured) -> None:
    if st.json_schema is not None:
        schema = st.json_schema
        msg.json_schema = schema if isinstance(schema, str) else json.dumps(schema)
    elif st.json_object:
        msg.json_object = True
    elif st.regex is not None:
        msg.regex = st.regex
    elif st.choice is not None:
        msg.choice.choices.extend(st.choice)
    elif st.grammar is not None:
        msg.grammar = st.grammar


def score_request(prompt: Prompt, labels: Sequence[str], model: str) -> gen_pb.ScoreRequest:
    req = gen_pb.ScoreRequest(model=model_ref(model), labels=list(labels))
    _fill_input(req, prompt)
    return req


def tokenize_request(prompt: Prompt, model: str) -> gen_pb.TokenizeRequest:
    req = gen_pb.TokenizeRequest(model=model_ref(model))
    _fill_input(req, prompt)
    return req


def model_info_request(model: str) -> models_pb.GetModelInfoRequest:
    name, _, ref = model.partition("@")
    return models_pb.GetModelInfoRequest(name=name, ref=ref)


def load_model_request(
    model: str, make_default: bool, beside: bool = False
) -> models_pb.LoadModelRequest:
    name, _, ref = model.partition("@")
    return models_pb.LoadModelRequest(name=name, ref=ref, make_default=make_default, beside=beside)


def _timings(t: Any) -> Timings:
    return Timings(
        queue_ms=t.queue_ms,
        prefill_ms=t.prefill_ms,
        ttft_ms=t.ttft_ms,
        decode_ms=t.decode_ms,
        total_ms=t.total_ms,
        draft=t.draft,
        draft_proposed=t.draft_proposed,
        draft_accepted=t.draft_accepted,
        draft_acceptance_rate=t.draft_acceptance_rate,
        parse_ms=t.parse_ms,
        template_ms=t.template_ms,
        tokenize_ms=t.tokenize_ms,
        admit_ms=t.admit_ms,
        first_token_out_ms=t.first_token_out_ms,
        render_ms=t.render_ms,
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
        cached_tokens=r.usage.cached_tokens,
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
        cached_tokens=r.usage.cached_tokens,
        request_id=r.request_id,
        model=r.model,
        model_digest=r.model_digest,
    )


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
        plan=m.plan,
        kernels=m.kernels,
        threads=m.threads,
        refused=dict(m.refused),
        measured=dict(m.measured),
        engine_pid=m.engine_pid,
        engine_restarts=m.engine_restarts,
        draft=m.draft,
        draft_tokens=m.draft_tokens,
        draft_proposed=m.draft_proposed,
        draft_accepted=m.draft_accepted,
        draft_acceptance_rate=m.draft_acceptance_rate,
        torch_threads=m.torch_threads,
    )


def to_token_ids(r: gen_pb.TokenizeResponse) -> list[int]:
    return list(r.token_ids)


def to_model_list(r: models_pb.ListModelsResponse) -> list[ModelInfo]:
    return [to_model_info(m) for m in r.models]


def to_serving_status(r: health_pb2.HealthCheckResponse) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
