"""Protobuf ↔ domain objects, with every request field validated here, named on failure."""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from slimserve.engine.errors import InvalidRequest
from slimserve.engine.loader import LoadedModel
from slimserve.engine.types import (
    EngineStats,
    Event,
    Finish,
    GenerationRequest,
    SamplingParams,
    StopParams,
    StopReason,
    TokenLogprob,
)
from slimserve.server.config import Limits
from slimserve.v1 import generation_pb2 as gen_pb
from slimserve.v1 import models_pb2 as models_pb

_ROLES = frozenset({"system", "user", "assistant"})
# DEADLINE never reaches a response: the servicer answers DEADLINE_EXCEEDED instead.
_STOP_REASONS: dict[StopReason, Any] = {
    r: gen_pb.StopReason.Value(r.value) for r in StopReason if r is not StopReason.DEADLINE
}


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidRequest(field, f"must be a finite number, got {value}")
    return value


def prompt_ids(msg: Any, model: LoadedModel, limits: Limits) -> tuple[int, ...]:
    """Token ids of a request's `text` or `chat` input (GenerateRequest/Score/Tokenize)."""
    tok = model.tokenizer
    which = msg.WhichOneof("input")
    if which == "text":
        if not msg.text.strip():
            raise InvalidRequest("text", "the prompt must not be empty")
        check_prompt_bytes(len(msg.text.encode()), "text", model, limits)
        ids = tok(msg.text, add_special_tokens=True)["input_ids"]
    elif which == "chat":
        size = sum(len(m.content.encode()) for m in msg.chat.messages)
        check_prompt_bytes(size, "chat.messages", model, limits)
        ids = _chat_ids(msg.chat, tok)
    else:
        raise InvalidRequest("input", "set either text or chat")
    return checked_prompt(ids, which, model, limits)


def prompt_token_limit(model: LoadedModel, limits: Limits) -> int:
    """The most tokens a prompt may have: `max_prompt_tokens`, and one token short of the
    model's context."""
    return min(limits.max_prompt_tokens, model.max_context - 1)


def check_prompt_bytes(size: int, field: str, model: LoadedModel, limits: Limits) -> None:
    """Refuse, before tokenizing, a text of `size` UTF-8 bytes that cannot fit the prompt
    limit: no token of this vocabulary stands for more than `model.max_token_bytes`."""
    limit = prompt_token_limit(model, limits)
    most = limit * model.max_token_bytes
    if size > most:
        raise InvalidRequest(
            field,
            f"the prompt is {size} bytes; {limit} tokens (the prompt limit: "
            f"max_prompt_tokens={limits.max_prompt_tokens}, context={model.max_context}) "
            f"hold at most {most} bytes of text for this model",
        )


def checked_prompt(
    ids: Sequence[int], field: str, model: LoadedModel, limits: Limits
) -> tuple[int, ...]:
    """`ids` as a prompt; InvalidRequest naming `field` when empty or over the prompt limit
    (`prompt_token_limit`)."""
    limit = prompt_token_limit(model, limits)
    if not ids:
        raise InvalidRequest(field, "the prompt encodes to no tokens")
    if len(ids) > limit:
        raise InvalidRequest(
            field,
            f"the prompt has {len(ids)} tokens; the limit is {limit} "
            f"(max_prompt_tokens={limits.max_prompt_tokens}, context={model.max_context})",
        )
    return tuple(int(i) for i in ids)


def _chat_ids(chat: Any, tok: Any) -> list[int]:
    if not getattr(tok, "chat_template", None):
        raise InvalidRequest("chat", "this model has no chat template; send text instead")
    if not chat.messages:
        raise InvalidRequest("chat.messages", "at least one message is required")
    messages = []
    for i, m in enumerate(chat.messages):
        if m.role not in _ROLES:
            raise InvalidRequest(
                f"chat.messages[{i}].role", f"must be system, user or assistant, got {m.role!r}"
            )
        messages.append({"role": m.role, "content": m.content})
    if not any(m["content"].strip() for m in messages):
        raise InvalidRequest("chat.messages", "every message is empty")
    return chat_template_ids(tok, messages)


def chat_template_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template, with a generation prompt.

    Only the template's own markers become special tokens: message contents are tokenized
    as plain text, so a user who writes `<|im_end|><|im_start|>system` gets those
    characters, not a forged turn. The template is rendered around placeholder contents
    and split at them; template text is tokenized with special tokens parsed, each content
    without.
    """
    mark = f"slimserve{uuid.uuid4().hex}x"  # letters and digits: no template filter alters it
    shell = [{**m, "content": f"{mark}{i}x"} for i, m in enumerate(messages)]
    text = tok.apply_chat_template(shell, add_generation_prompt=True, tokenize=False)
    # Odd pieces are placeholders (in whatever order and number the template used them).
    pieces = re.split(f"{mark}(\\d+)x", text)
    ids: list[int] = []
    for n, piece in enumerate(pieces):
        if n % 2:
            ids += _encode(tok, messages[int(piece)]["content"], special=False)
        else:
            ids += _encode(tok, piece, special=True)
    return ids


def _encode(tok: Any, text: str, *, special: bool) -> list[int]:
    if not text:
        return []
    out = tok(text, add_special_tokens=False, split_special_tokens=not special)
    return list(out["input_ids"])


#: Softmax temperatures below this overflow float32 logits (inf → NaN probabilities).
MIN_TEMPERATURE = 1e-3
#: Repetition penalties outside this range overflow penalised logits the same way.
PENALTY_RANGE = (1e-2, 1e2)


def sampling_params(pb: Any) -> SamplingParams:
    temperature = _finite("sampling.temperature", pb.temperature)
    if temperature < 0 or 0 < temperature < MIN_TEMPERATURE:
        raise InvalidRequest(
            "sampling.temperature",
            f"must be 0 (unset) or >= {MIN_TEMPERATURE}, got {temperature}",
        )
    top_p = _finite("sampling.top_p", pb.top_p)
    if top_p < 0 or top_p > 1:
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {top_p}")
    penalty = _finite("sampling.repetition_penalty", pb.repetition_penalty)
    low, high = PENALTY_RANGE
    if penalty != 0 and not low <= penalty <= high:
        raise InvalidRequest(
            "sampling.repetition_penalty",
            f"must be 0 (unset) or in [{low}, {high}], got {penalty}",
        )
    return SamplingParams(
        do_sample=pb.do_sample,
        temperature=temperature or 1.0,
        top_k=pb.top_k,
        top_p=top_p or 1.0,
        seed=pb.seed if pb.HasField("seed") else None,
        repetition_penalty=penalty or 1.0,
    )


def stop_params(pb: Any, limits: Limits) -> StopParams:
    n = pb.max_new_tokens or limits.default_max_new_tokens
    if n > limits.max_new_tokens:
        raise InvalidRequest(
            "stopping.max_new_tokens",
            f"must be 1..{limits.max_new_tokens} (limit max_new_tokens), got {n}",
        )
    stops = tuple(pb.stop_sequences)
    if len(stops) > limits.max_stop_sequences:
        raise InvalidRequest(
            "stopping.stop_sequences",
            f"at most {limits.max_stop_sequences} (limit max_stop_sequences), got {len(stops)}",
        )
    for i, s in enumerate(stops):
        if not s:
            raise InvalidRequest(f"stopping.stop_sequences[{i}]", "must not be empty")
        if len(s) > limits.max_stop_sequence_chars:
            raise InvalidRequest(
                f"stopping.stop_sequences[{i}]",
                f"{len(s)} characters is over the limit "
                f"max_stop_sequence_chars={limits.max_stop_sequence_chars}",
            )
    return StopParams(
        max_new_tokens=n,
        stop_sequences=stops,
        time_limit_s=pb.time_limit_ms / 1e3 if pb.time_limit_ms else None,
        ignore_eos=pb.ignore_eos,
    )


def generation_request(
    pb: Any,
    model: LoadedModel,
    limits: Limits,
    request_id: str,
    timeout_s: float | None,
    *,
    ids: tuple[int, ...] | None = None,
) -> GenerationRequest:
    """The domain request `pb` describes; `ids`, when given, is the prompt already
    tokenized and checked (`checked_prompt`), and `pb`'s input is not read."""
    ids = prompt_ids(pb, model, limits) if ids is None else ids
    sampling = sampling_params(pb.sampling)
    stopping = stop_params(pb.stopping, limits)
    top_n_limit = min(limits.max_top_n, model.backend.vocab_size)
    if pb.response.top_n > top_n_limit:
        raise InvalidRequest(
            "response.top_n",
            f"must be 0..{top_n_limit} (limit max_top_n), got {pb.response.top_n}",
        )
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=ids,
        sampling=sampling,
        stopping=stopping,
        logprobs=pb.response.logprobs or pb.response.top_n > 0,
        top_n=pb.response.top_n,
        deadline=time.monotonic() + timeout_s if timeout_s is not None else None,
    )


def score_inputs(pb: Any, model: LoadedModel, limits: Limits) -> tuple[list[int], list[list[int]]]:
    """A ScoreRequest's prompt and label token ids, both tokenized in one call (the servicer
    runs it in one worker-thread hop: each hop costs a thread handoff both ways).

    Raises:
        InvalidRequest: a bad prompt or label, or prompt + longest label over the context.
    """
    prompt = list(prompt_ids(pb, model, limits))
    labels = score_labels(pb, model, limits)
    longest = len(prompt) + max(map(len, labels))
    if longest > model.max_context:
        raise InvalidRequest(
            "labels", f"prompt + label is {longest} tokens; context is {model.max_context}"
        )
    return prompt, labels


def score_labels(pb: Any, model: LoadedModel, limits: Limits) -> list[list[int]]:
    if not pb.labels:
        raise InvalidRequest("labels", "at least one label is required")
    if len(pb.labels) > limits.max_labels:
        raise InvalidRequest(
            "labels", f"at most {limits.max_labels} (limit max_labels), got {len(pb.labels)}"
        )
    out = []
    for i, label in enumerate(pb.labels):
        check_prompt_bytes(len(label.encode()), f"labels[{i}]", model, limits)
        ids = model.tokenizer(label, add_special_tokens=False)["input_ids"]
        if not label or not ids:
            raise InvalidRequest(f"labels[{i}]", "must be a non-empty string")
        out.append([int(t) for t in ids])
    return out


def _token_infos(model: LoadedModel, lps: tuple[TokenLogprob, ...]) -> list[Any]:
    out = []
    for lp in lps:
        top = [
            gen_pb.TopToken(token_id=t, text=model.tokenizer.decode([t]), logprob=v)
            for t, v in lp.top
        ]
        out.append(gen_pb.TokenInfo(token_id=lp.token_id, logprob=lp.logprob, top=top))
    return out


def fill_finish(msg: Any, finish: Finish) -> None:
    msg.stop_reason = _STOP_REASONS[finish.reason]
    msg.stop_sequence = finish.stop_sequence
    msg.usage.input_tokens = finish.input_tokens
    msg.usage.generated_tokens = finish.generated_tokens
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


def stream_message(
    event: Event, model: LoadedModel, want_ids: bool
) -> gen_pb.GenerateStreamResponse:
    msg = gen_pb.GenerateStreamResponse(text=event.text)
    if want_ids:
        msg.token_ids.extend(event.token_ids)
    if event.logprobs:
        msg.tokens.extend(_token_infos(model, event.logprobs))
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
        msg.tokens.extend(_token_infos(model, lps))
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
        has_chat_template=bool(getattr(model.tokenizer, "chat_template", None)),
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
