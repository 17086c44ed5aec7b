"""How to run a model: built once by the CLI (or a test), passed whole to the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slimserve.engine.spec_policy import DRAFT_POLICIES

BackendName = Literal["auto", "hf", "llama", "llamacpp"]
GgufWeights = Literal["auto", "q8_0", "q4_1", "f16", "f32"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
#: `ModelConfig.draft` for the model-free prompt-lookup drafter.
NGRAM = "ngram"
#: `ModelConfig.kv_layout`: how a llama.cpp backend lays out its KV cache ("auto": split
#: when a context of max_seq_len per stream fits the KV budget, else unified).
KV_LAYOUTS = ("auto", "unified", "split")
#: `kv_cache_mb = 0`: the budget contexts are sized by, and the most a llama.cpp pool takes
#: (at SmolLM2-135M's 23 KB of float16 K and V a token: ~11,600 tokens shared by all streams).
AUTO_KV_CACHE_MB = 1024
AUTO_KV_POOL_MB = 256


def kv_budget_bytes(config: ModelConfig) -> int:
    """The per-slot sizing budget `kv_cache_mb` stands for (auto: `AUTO_KV_CACHE_MB`)."""
    return (config.kv_cache_mb or AUTO_KV_CACHE_MB) * 2**20


def kv_pool_bytes(config: ModelConfig) -> int:
    """The most one pooled (llama.cpp) KV cache may take (auto: `AUTO_KV_POOL_MB`)."""
    return (config.kv_cache_mb or AUTO_KV_POOL_MB) * 2**20


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """How to run a model: device, dtype, batch and context sizes, backend."""

    device: str = "auto"
    dtype: Dtype = "auto"
    backend: BackendName = "auto"
    #: How the llama.cpp backend stores linear weights (slimserve.engine.backends.gguf_export);
    #: "auto" keeps the artifact's own precision: q8_0 for int8 artifacts, else f16 or f32.
    gguf_type: GgufWeights = "auto"
    #: Concurrent sequences per model (KV-cache slots).
    max_batch: int = 16
    #: Longest prompt + generation per sequence; 0 = the model's own limit, capped at 4096
    #: and at what `kv_cache_mb` allows for `max_batch` sequences.
    max_seq_len: int = 0
    #: KV-cache budget per model in MiB, allocated up front. The torch backends give every
    #: slot its own `max_seq_len` of it; llama.cpp holds one pool of cells that every
    #: sequence draws on (each up to `max_seq_len`; a request waits while the pool cannot
    #: hold its prompt and max_new_tokens). 0 = auto: contexts sized as for 1024 MiB of
    #: per-slot cache, and a llama.cpp pool of at most `AUTO_KV_POOL_MB`.
    kv_cache_mb: int = 0
    #: How llama.cpp lays out the KV cache (`KV_LAYOUTS`): "unified", the pool above;
    #: "split", max_seq_len cells held for each sequence (and each Score row), whose decode
    #: step reads only each stream's own cells: faster, the engine keeping the running
    #: slots consecutive; "auto", split when that fits the budget above, else unified.
    kv_layout: str = "auto"
    #: Requests waiting for a slot beyond this get RESOURCE_EXHAUSTED.
    max_queue: int = 64
    #: Tokens of Score work between two decode steps (how long streams wait for a Score).
    score_step_tokens: int = 2048
    #: Tokens one Score call may put through the model; more is INVALID_ARGUMENT.
    max_score_tokens: int = 65536
    #: Warm-up generation before reporting SERVING.
    warmup: bool = True
    #: Run each model's engine in its own supervised process (the server then holds no
    #: weights and survives a native crash). False runs it in the server process.
    engine_process: bool = True
    #: Extra backends as "module:factory" import paths; a named plugin that qualifies is
    #: preferred over the built-in plans.
    backend_plugins: tuple[str, ...] = ()
    #: Qualify plans in throwaway processes before serving (see `slimserve.engine.qualify`).
    qualify: bool = True
    #: Engine process restarts: first backoff, and how many crashes within the window mark
    #: the serving plan bad on this machine.
    restart_backoff_s: float = 0.5
    max_crashes: int = 3
    crash_window_s: float = 300.0
    #: Seconds a crash-loop verdict keeps the plan from serving on this machine; after it
    #: the plan is qualified again. Only deaths by the plan's own fault count towards it
    #: (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, a hung step), never SIGKILL or SIGTERM.
    crash_verdict_ttl_s: float = 86400.0
    #: Seconds one engine step (a decode, a prefill, a Score chunk) may run before the
    #: server kills the engine process and restarts it; 0 = no watchdog.
    engine_step_timeout_s: float = 300.0
    #: Speculative decoding (`slimserve.engine.speculative`): "ngram" for model-free prompt
    #: lookup, or a draft model "NAME@REF" from the registry that shares the tokenizer;
    #: None serves without drafts. Output is the same either way (greedy: token for token).
    draft: str | None = None
    #: Tokens drafted per sequence and step: at most, as many as pay on this machine
    #: ("adaptive", `slimserve.engine.spec_policy`), or always ("always").
    draft_tokens: int = 4
    draft_policy: str = "adaptive"

    def __post_init__(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_seq_len < 0:
            raise ValueError(f"max_seq_len must be >= 0, got {self.max_seq_len}")
        for plugin in self.backend_plugins:
            if plugin.count(":") != 1 or not all(plugin.split(":")):
                raise ValueError(f"backend plugin {plugin!r} must be 'module:factory'")
        if self.score_step_tokens < 1 or self.max_score_tokens < 1:
            raise ValueError("score_step_tokens and max_score_tokens must be >= 1")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.kv_cache_mb < 0:
            raise ValueError(f"kv_cache_mb must be >= 0 (0 = auto), got {self.kv_cache_mb}")
        if self.draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {self.draft_tokens}")
        if self.draft_policy not in DRAFT_POLICIES:
            raise ValueError(
                f"draft_policy must be one of {DRAFT_POLICIES}, got {self.draft_policy!r}"
            )
        if not self.crash_verdict_ttl_s > 0 or not self.engine_step_timeout_s >= 0:
            raise ValueError("crash_verdict_ttl_s must be > 0 and engine_step_timeout_s >= 0")
        if self.draft is not None and self.draft != NGRAM and not self.draft.strip():
            raise ValueError("draft must be 'ngram' or a model NAME@REF")
