"""Domain objects passed between doors, engine and scheduler (no protobuf here).

They are `msgspec.Struct`s with `array_like=True`: the wire between the server and an
engine process (`slimserve.engine.ipc`) is derived from these types, each struct a
msgpack array in field order, never restated by hand (as vLLM's engine core does). A new
field is one line here, with its default; old peers do not exist (both processes run
the same code).
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class StopReason(enum.Enum):
    MAX_TOKENS = "MAX_TOKENS"
    EOS_TOKEN = "EOS_TOKEN"
    STOP_SEQUENCE = "STOP_SEQUENCE"
    TIME_LIMIT = "TIME_LIMIT"
    CANCELLED = "CANCELLED"
    TOKEN_LIMIT = "TOKEN_LIMIT"
    #: The caller's deadline passed (the server answers DEADLINE_EXCEEDED, never OK).
    DEADLINE = "DEADLINE"


class Message(msgspec.Struct, frozen=True, array_like=True):
    """One chat message; `role` is system, user or assistant (doors map their own)."""

    role: str
    content: str


class Prompt(msgspec.Struct, frozen=True, array_like=True):
    """A request's input, exactly one of: text, chat messages (rendered by the model's
    chat template in the engine process) or token ids. The engine process turns text and
    messages into ids (`slimserve.engine.inputs`); the scheduler sees ids only."""

    text: str | None = None
    messages: tuple[Message, ...] | None = None
    ids: tuple[int, ...] | None = None


class SamplingParams(msgspec.Struct, frozen=True, array_like=True):
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample and self.repetition_penalty == 1.0

    def replace(self, **changes: Any) -> SamplingParams:
        return msgspec.structs.replace(self, **changes)


class StopParams(msgspec.Struct, frozen=True, array_like=True):
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    #: Wall-clock budget from arrival, seconds; None = none.
    time_limit_s: float | None = None
    ignore_eos: bool = False


#: `Guided.kind`s: what a structured output is held to.
GUIDED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class Guided(msgspec.Struct, frozen=True, array_like=True):
    """Structured output: every token is masked to what keeps the output valid, and the
    output ends only where it is complete (`slimserve.engine.structured`)."""

    #: One of `GUIDED_KINDS`.
    kind: str
    #: json_schema: the schema as JSON text; regex: the pattern; grammar: a GBNF or Lark
    #: grammar; json_object: "" (any JSON object); choice: "".
    spec: str = ""
    #: choice: the output is exactly one of these strings.
    choices: tuple[str, ...] = ()
    #: json_schema: an object schema that lists `properties` and says nothing of
    #: `additionalProperties` takes no others (OpenAI's strict mode). False: JSON Schema's
    #: own default (others allowed). The output validates against the schema either way.
    strict: bool = True


class GenerationRequest(msgspec.Struct, frozen=True, array_like=True):
    """One generation, as every door submits it (validated by `server.generation`)."""

    request_id: str
    prompt: Prompt
    sampling: SamplingParams
    stopping: StopParams
    logprobs: bool = False
    top_n: int = 0
    #: time.monotonic() after which the request is cancelled (the caller's deadline).
    deadline: float | None = None
    #: The most tokens the prompt may have (the server's limit and the context); checked
    #: once the engine process has tokenized it. 0: the context alone.
    prompt_limit: int = 0
    #: The first event carries the prompt's text (decoded from ids if need be): an echo.
    echo: bool = False
    #: Structured output, None = free text.
    guided: Guided | None = None

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        """The prompt's token ids (what the scheduler runs; empty before tokenizing)."""
        return self.prompt.ids or ()

    def replace(self, **changes: Any) -> GenerationRequest:
        return msgspec.structs.replace(self, **changes)


class ScoreRequest(msgspec.Struct, frozen=True, array_like=True):
    """Log-probabilities of each label as a continuation of the prompt."""

    request_id: str
    prompt: Prompt
    labels: tuple[str, ...]
    deadline: float | None = None
    prompt_limit: int = 0


class ScoreResult(msgspec.Struct, frozen=True, array_like=True):
    #: Each label's summed log-probability, in order.
    logprobs: tuple[float, ...]
    input_tokens: int
    #: Tokens of each label.
    label_tokens: tuple[int, ...]


class TokenizeResult(msgspec.Struct, frozen=True, array_like=True):
    ids: tuple[int, ...]
    #: Each id's vocabulary entry (None for an id the vocabulary does not name).
    tokens: tuple[str | None, ...] = ()
    #: The ids decoded (an echo of a prompt sent as ids).
    text: str = ""


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """A token with its log-probability and its position's best alternatives; the texts
    are decoded in the engine process, where the tokens are."""

    token_id: int
    #: None for a prompt's first token, which has no context to be predicted from.
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()
    #: The token's own text (a lone piece of a multi-byte character decodes to U+FFFD).
    text: str = ""
    #: The text of each `top` entry, in order.
    top_text: tuple[str, ...] = ()


class Timings(msgspec.Struct, frozen=True, array_like=True, kw_only=True):
    """Milliseconds, measured in the engine."""

    queue_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_ms: float
    total_ms: float
    #: The drafter that proposed tokens for this request ("" = none).
    draft: str = ""
    #: Draft tokens proposed, and how many of them the target accepted.
    draft_proposed: int = 0
    draft_accepted: int = 0
    #: The phases before and around the engine's (0: not measured on this path). The door
    #: parsing its wire into a request (the call's start to its submission) ...
    parse_ms: float = 0.0
    #: ... the engine process rendering the chat template (0 for text or ids) and encoding
    #: the prompt into token ids ...
    template_ms: float = 0.0
    tokenize_ms: float = 0.0
    #: ... the scheduler admitting it (a slot and KV cells taken) until its prompt's first
    #: pass (0 while the scheduler does not report it) ...
    admit_ms: float = 0.0
    #: ... the hops between door and engine for the first token, both ways (the door's time
    #: to its first token less the engine's phases above and `ttft_ms`) ...
    first_token_out_ms: float = 0.0
    #: ... and the door rendering and writing the events before the last.
    render_ms: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0


class Finish(msgspec.Struct, frozen=True, array_like=True, kw_only=True):
    reason: StopReason
    stop_sequence: str
    input_tokens: int
    generated_tokens: int
    timings: Timings
    #: Prompt tokens whose KV came from the prefix cache rather than a prefill.
    cached_tokens: int = 0


class Accepted(msgspec.Struct, frozen=True, array_like=True):
    """The first event of a generation: its prompt is tokenized and queued."""

    input_tokens: int
    #: The prompt's text, when the request asked for an echo.
    prompt_text: str = ""
    #: Milliseconds the engine process took to render the chat template and to tokenize.
    template_ms: float = 0.0
    tokenize_ms: float = 0.0


class Event(msgspec.Struct, frozen=True, array_like=True, kw_only=True):
    """What the engine tells a request's consumer: accepted, a text delta, the end, or an
    error (a domain error from `slimserve.engine.errors`)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish: Finish | None = None
    error: BaseException | None = None
    accepted: Accepted | None = None


class EngineStats(msgspec.Struct, array_like=True, kw_only=True):
    running: int = 0
    queued: int = 0
    free_slots: int = 0
    steps: int = 0
    generated_tokens: int = 0
    finished: dict[str, int] = msgspec.field(default_factory=dict)
    #: Draft tokens proposed and accepted over the engine's life (speculative decoding).
    draft_proposed: int = 0
    draft_accepted: int = 0
    #: Running sequences moved down into a freed slot (a cache split per sequence).
    slot_moves: int = 0
    #: Seconds the worker spent in each phase of its decode steps, summed (`PHASES`).
    phase_s: dict[str, float] = msgspec.field(default_factory=dict)
    #: Prompt tokens of the requests admitted, and how many of them came from the prefix
    #: cache; admissions that reused a prefix (`slimserve.engine.prefix`).
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefix_hits: int = 0
    admitted: int = 0


#: Where the worker's time goes: prefilling the requests just admitted (with their first
#: token), moving running sequences down into freed slots (a cache split per sequence),
#: then a decode step's phases: proposing drafts, the model's forward pass,
#: choosing tokens (argmax, sampling, the acceptance rule), emitting them (detokenization,
#: stop checks, events) and flushing the step's events to their consumers (the engine
#: process's pipe).
PHASES = ("prefill", "compact", "draft", "forward", "pick", "emit", "flush")


class BackendInfo(msgspec.Struct, frozen=True, array_like=True, kw_only=True):
    """What the server needs to know of a backend that may live in another process."""

    name: str
    max_slots: int
    max_seq_len: int
    vocab_size: int
    kv_bytes: int

    def kv_bytes_per_slot(self) -> int:
        return self.kv_bytes


class EngineInfo(msgspec.Struct, frozen=True, array_like=True, kw_only=True):
    """How one model is being served: by which plan, where, and what was refused."""

    backend: BackendInfo
    #: The serving plan's key ("llamacpp/q8_0/extra-on", "llama/bfloat16", ...).
    plan: str
    #: The kernels in words ("llama.cpp q8_0, extra buffers on").
    kernels: str
    device: str
    dtype: str
    #: Tokens per sequence (prompt + generated).
    max_context: int
    #: Threads of the forward pass (torch intra-op or llama.cpp).
    threads: int
    #: The engine process's pid (the server's own when in-process).
    pid: int
    in_process: bool
    eos_token_ids: tuple[int, ...] = ()
    #: Plan or backend -> why it does not serve here (refused, crashed, slower, worse).
    refused: dict[str, str] = msgspec.field(default_factory=dict)
    #: The serving plan's measurements (decode tokens/s, perplexity ratio, ...).
    measured: dict[str, float] = msgspec.field(default_factory=dict)
    #: The drafter of speculative decoding ("" = none), and tokens it proposes per step.
    draft: str = ""
    draft_tokens: int = 0
    #: Threads of torch's intra-op pool in the engine (sampling, logits), set apart from
    #: `threads` so the two pools do not contend for the same cores.
    torch_threads: int = 0
    #: Input bytes one token stands for at most (`tokenizer.token_bytes_bound`): a prompt
    #: longer than this times its token limit is refused before it crosses to the engine.
    max_token_bytes: int = 0
    #: Whether the model has a chat template (messages can be sent).
    has_chat_template: bool = False
    #: Tokens of forward passes one Score (or an echo's log-probabilities) may take.
    max_score_tokens: int = 0

    def replace(self, **changes: Any) -> EngineInfo:
        return msgspec.structs.replace(self, **changes)
