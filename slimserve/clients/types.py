"""Typed results and request options returned by the clients (plain dataclasses)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Sampling:
    """Greedy by default; set `do_sample=True` with temperature/top_k/top_p/seed to sample."""

    do_sample: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Structured:
    """Structured output: set one. The text then is JSON valid against `json_schema` (a
    dict or its JSON text), any JSON object (`json_object`), a full match of `regex`, one
    of `choice`, or a sentence of `grammar` (GBNF or Lark). A spec the server cannot
    compile is InvalidArgument, never free text."""

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Timings:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    #: Speculative decoding: the drafter ("" = none), tokens it proposed, tokens accepted.
    draft: str = ""
    draft_proposed: int = 0
    draft_accepted: int = 0
    draft_acceptance_rate: float = 0.0
    #: Where the milliseconds went (the server's phases; 0: not on this path): the door's
    #: parse, the engine's chat template and tokenize, admission, the first token's hops
    #: between door and engine, the door's rendering.
    parse_ms: float = 0.0
    template_ms: float = 0.0
    tokenize_ms: float = 0.0
    admit_ms: float = 0.0
    first_token_out_ms: float = 0.0
    render_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Generation:
    """A finished completion."""

    request_id: str
    model: str
    model_digest: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    stop_reason: str
    stop_sequence: str
    input_tokens: int
    generated_tokens: int
    timings: Timings
    #: Of `input_tokens`, those the server's prefix cache supplied (not prefilled again).
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamChunk:
    """One streamed message. `stop_reason` is set on the last one only."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    stop_reason: str = ""
    stop_sequence: str = ""
    input_tokens: int = 0
    generated_tokens: int = 0
    timings: Timings | None = None
    #: Set on the last message: prompt tokens the prefix cache supplied.
    cached_tokens: int = 0
    # Set on the first message of a stream.
    request_id: str = ""
    model: str = ""
    model_digest: str = ""

    @property
    def is_last(self) -> bool:
        return bool(self.stop_reason)


@dataclass(frozen=True, slots=True)
class LabelScore:
    label: str
    logprob: float
    probability: float
    num_tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreResult:
    request_id: str
    model: str
    model_digest: str
    scores: tuple[LabelScore, ...]
    input_tokens: int
    latency_ms: float

    def probability(self, label: str) -> float:
        for s in self.scores:
            if s.label == label:
                return s.probability
        raise KeyError(label)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    name: str
    version: int
    aliases: tuple[str, ...]
    digest: str
    parent: str
    source: str
    recipe: str
    device: str
    dtype: str
    backend: str
    quantization: str
    parameters: int
    max_context: int
    max_batch: int
    kv_bytes_per_sequence: int
    has_chat_template: bool
    metrics: dict[str, float] = field(default_factory=dict)
    is_default: bool = False
    state: str = ""
    #: The serving plan ("llamacpp/q8_0/extra-on") and the same in words.
    plan: str = ""
    kernels: str = ""
    threads: int = 0
    #: Plan or backend -> why it does not serve on the server's machine.
    refused: dict[str, str] = field(default_factory=dict)
    #: The serving plan's figures measured at qualification on the server's machine.
    measured: dict[str, float] = field(default_factory=dict)
    engine_pid: int = 0
    engine_restarts: int = 0
    #: Speculative decoding: the drafter ("" = none), tokens drafted per step, and its
    #: proposed / accepted counts since the engine started.
    draft: str = ""
    draft_tokens: int = 0
    draft_proposed: int = 0
    draft_accepted: int = 0
    draft_acceptance_rate: float = 0.0
    #: Threads of torch's pool in the engine (token selection), apart from `threads`.
    torch_threads: int = 0

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"
