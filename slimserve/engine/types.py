"""Domain objects passed between servicer, engine and scheduler (no protobuf here)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class StopReason(enum.Enum):
    MAX_TOKENS = "MAX_TOKENS"
    EOS_TOKEN = "EOS_TOKEN"
    STOP_SEQUENCE = "STOP_SEQUENCE"
    TIME_LIMIT = "TIME_LIMIT"
    CANCELLED = "CANCELLED"
    TOKEN_LIMIT = "TOKEN_LIMIT"
    #: The caller's deadline passed (the server answers DEADLINE_EXCEEDED, never OK).
    DEADLINE = "DEADLINE"


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample and self.repetition_penalty == 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StopParams:
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    #: Wall-clock budget from arrival, seconds; None = none.
    time_limit_s: float | None = None
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StopParams
    logprobs: bool = False
    top_n: int = 0
    #: time.monotonic() after which the request is cancelled (the gRPC deadline).
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Timings:
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

    @property
    def acceptance_rate(self) -> float:
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Finish:
    reason: StopReason
    stop_sequence: str
    input_tokens: int
    generated_tokens: int
    timings: Timings


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """What the engine tells a request's consumer: a text delta, the end, or an error."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish: Finish | None = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Occupancy:
    """How full an engine is after its latest step: what a load-aware router reads (the
    llm-d / Gateway API Inference Extension gauges, `vllm:num_requests_waiting` and
    `vllm:kv_cache_usage_perc`). An engine process sends it with each step's events, so
    the server knows it without asking."""

    running: int = 0
    #: Generation requests queued for a slot (or, with a shared llama.cpp pool, for room).
    waiting: int = 0
    free_slots: int = 0
    #: KV-cache cells (one per token of one sequence) the running sequences hold.
    kv_cells_used: int = 0
    #: Cells the cache has for sequences: the llama.cpp pool's, else slots x max_seq_len.
    kv_cells: int = 0

    @property
    def kv_usage(self) -> float:
        """Cells in use over cells available, 0..1 (0 when the size is not known yet)."""
        return min(1.0, self.kv_cells_used / self.kv_cells) if self.kv_cells else 0.0


@dataclass(slots=True)
class EngineStats:
    running: int = 0
    queued: int = 0
    free_slots: int = 0
    steps: int = 0
    generated_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    #: Draft tokens proposed and accepted over the engine's life (speculative decoding).
    draft_proposed: int = 0
    draft_accepted: int = 0
    #: Running sequences moved down into a freed slot (a cache split per sequence).
    slot_moves: int = 0
    #: Seconds the worker spent in each phase of its decode steps, summed (`PHASES`).
    phase_s: dict[str, float] = field(default_factory=dict)


#: Where the worker's time goes: prefilling the requests just admitted (with their first
#: token), moving running sequences down into freed slots (a cache split per sequence),
#: then a decode step's phases: proposing drafts, the model's forward pass,
#: choosing tokens (argmax, sampling, the acceptance rule), emitting them (detokenization,
#: stop checks, events) and flushing the step's events to their consumers (the engine
#: process's pipe).
PHASES = ("prefill", "compact", "draft", "forward", "pick", "emit", "flush")


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendInfo:
    """What the server needs to know of a backend that may live in another process."""

    name: str
    max_slots: int
    max_seq_len: int
    vocab_size: int
    kv_bytes: int

    def kv_bytes_per_slot(self) -> int:
        return self.kv_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineInfo:
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
    refused: dict[str, str] = field(default_factory=dict)
    #: The serving plan's measurements (decode tokens/s, perplexity ratio, ...).
    measured: dict[str, float] = field(default_factory=dict)
    #: The drafter of speculative decoding ("" = none), and tokens it proposes per step.
    draft: str = ""
    draft_tokens: int = 0
    #: Threads of torch's intra-op pool in the engine (sampling, logits), set apart from
    #: `threads` so the two pools do not contend for the same cores.
    torch_threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineInfo:
        return cls(
            **{
                **d,
                "backend": BackendInfo(**d["backend"]),
                "eos_token_ids": tuple(d["eos_token_ids"]),
            }
        )
