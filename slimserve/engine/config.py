"""How to run a model: built once by the CLI (or a test), passed whole to the engine.

`ModelConfig` is five sections, each validated once, where it is built, and each handed
whole to the part that reads it:

- `LoadConfig`: where the weights go and which plan serves them (loader, qualification);
- `CacheConfig`: slots and the KV cache (backends);
- `EngineConfig`: the scheduler's queue and Score budget (`scheduler.Engine`);
- `RestartConfig`: the engine process's restarts (`supervisor.SupervisedEngine`);
- `DraftConfig`: speculative decoding (loader, `speculative_step`).

It crosses to the engine process as plain values (`to_dict` / `from_dict`, versioned), and
`replace(**fields)` changes fields by name in whichever section holds them (field names are
unique across sections), for the CLI's flags and for tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from slimserve.engine.spec_policy import DRAFT_POLICIES

BackendName = Literal["auto", "hf", "llama", "llamacpp"]
GgufWeights = Literal["auto", "q8_0", "q4_1", "f16", "f32"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
#: `DraftConfig.source` for the model-free prompt-lookup drafter.
NGRAM = "ngram"
#: `CacheConfig.kv_layout`: how a llama.cpp backend lays out its KV cache ("auto": split
#: when a context of max_seq_len per stream fits the KV budget, else unified).
KV_LAYOUTS = ("auto", "unified", "split")
#: `kv_cache_mb = 0`: the budget contexts are sized by, and the most a llama.cpp pool takes
#: (at SmolLM2-135M's 23 KB of float16 K and V a token: ~11,600 tokens shared by all streams).
AUTO_KV_CACHE_MB = 1024
AUTO_KV_POOL_MB = 256
_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadConfig:
    """Where the weights load and which plan serves them."""

    device: str = "auto"
    dtype: Dtype = "auto"
    backend: BackendName = "auto"
    #: How the llama.cpp backend stores linear weights (slimserve.engine.backends.gguf_export);
    #: "auto" keeps the artifact's own precision: q8_0 for int8 artifacts, else f16 or f32.
    gguf_type: GgufWeights = "auto"
    #: Extra backends as "module:factory" import paths; a named plugin that qualifies is
    #: preferred over the built-in plans. Only configuration names code to import.
    backend_plugins: tuple[str, ...] = ()
    #: Qualify plans in throwaway processes before serving (see `slimserve.engine.qualify`).
    qualify: bool = True
    #: Warm-up generation before reporting SERVING.
    warmup: bool = True
    #: Run each model's engine in its own supervised process (the server then holds no
    #: weights and survives a native crash). False runs it in the server process.
    engine_process: bool = True
    #: llama.cpp: threads of a one-token pass (a single sequence decoding); every larger
    #: pass runs on all threads. 0 = the count qualification measured fastest on this
    #: machine (all threads when nothing was qualified).
    decode_threads: int = 0
    #: llama.cpp: run passes on persistent ggml threadpools whose workers sleep between
    #: passes; False: llama.cpp's own pool per call (its workers spin before they sleep).
    ggml_threadpool: bool = True

    def __post_init__(self) -> None:
        if not (self.device in _DEVICES or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.decode_threads < 0:
            raise ValueError(
                f"decode_threads must be >= 0 (0 = measured), got {self.decode_threads}"
            )
        for plugin in self.backend_plugins:
            if plugin.count(":") != 1 or not all(plugin.split(":")):
                raise ValueError(f"backend plugin {plugin!r} must be 'module:factory'")


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    """Sequences at once and the KV cache they share."""

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

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_seq_len < 0:
            raise ValueError(f"max_seq_len must be >= 0, got {self.max_seq_len}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.kv_cache_mb < 0:
            raise ValueError(f"kv_cache_mb must be >= 0 (0 = auto), got {self.kv_cache_mb}")

    def kv_budget_bytes(self) -> int:
        """The per-slot sizing budget `kv_cache_mb` stands for (auto: `AUTO_KV_CACHE_MB`)."""
        return (self.kv_cache_mb or AUTO_KV_CACHE_MB) * 2**20

    def kv_pool_bytes(self) -> int:
        """The most one pooled (llama.cpp) KV cache may take (auto: `AUTO_KV_POOL_MB`)."""
        return (self.kv_cache_mb or AUTO_KV_POOL_MB) * 2**20


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """The scheduler's admission queue and Score budget (the engine is the only judge of
    admission: the server forwards and reports what the engine answers)."""

    #: Requests waiting for a slot beyond this (and Score jobs queued beyond it) are
    #: refused with `Overloaded` (RESOURCE_EXHAUSTED, 429).
    max_queue: int = 64
    #: Tokens of Score work between two decode steps (how long streams wait for a Score).
    score_step_tokens: int = 2048
    #: Tokens one Score call may put through the model (prompt + label - 1, summed); more
    #: is INVALID_ARGUMENT.
    max_score_tokens: int = 65536
    #: How long a step should take while streams decode (`planner.StepBudget`): prompt
    #: chunks and Score work are sized from measured speed to fit beside the decode tokens,
    #: which bounds the gap between two tokens of a stream.
    max_step_ms: float = 100.0
    #: Start a new request from the longest prompt prefix whose KV a finished (or running)
    #: request left in the cache (`slimserve.engine.prefix`), where the backend can.
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.score_step_tokens < 1 or self.max_score_tokens < 1:
            raise ValueError("score_step_tokens and max_score_tokens must be >= 1")
        if not self.max_step_ms > 0:
            raise ValueError(f"max_step_ms must be > 0, got {self.max_step_ms}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartConfig:
    """Restarts of a model's engine process: exponential backoff from `backoff_s` up to
    `max_backoff_s`; `max_crashes` crashes by the plan's own fault within `crash_window_s`
    mark the serving plan bad on this machine for `crash_verdict_ttl_s`. A watchdog kills
    and restarts an engine whose step runs past `step_timeout_s`."""

    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_crashes: int = 3
    crash_window_s: float = 300.0
    #: Seconds a crash-loop verdict keeps the plan from serving on this machine; after it
    #: the plan is qualified again. Only deaths by the plan's own fault count towards it
    #: (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, a hung step), never SIGKILL or SIGTERM.
    crash_verdict_ttl_s: float = 86400.0
    #: Seconds one engine step (a decode, a prefill, a Score chunk) may run before the
    #: server kills the engine process and restarts it; 0 = no watchdog.
    step_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.backoff_s <= 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("restart backoff must be > 0 and <= its maximum")
        if self.max_crashes < 1 or self.crash_window_s <= 0:
            raise ValueError("max_crashes must be >= 1 and crash_window_s > 0")
        if not self.crash_verdict_ttl_s > 0 or not self.step_timeout_s >= 0:  # NaN fails
            raise ValueError("crash_verdict_ttl_s must be > 0 and step_timeout_s >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class DraftConfig:
    """Speculative decoding (`slimserve.engine.speculative`). Output is the same either
    way (greedy: token for token)."""

    #: "ngram" for model-free prompt lookup, or a draft model "NAME@REF" from the registry
    #: that shares the tokenizer; None serves without drafts.
    source: str | None = None
    #: Tokens drafted per sequence and step: at most, as many as pay on this machine
    #: ("adaptive", `slimserve.engine.spec_policy`), or always ("always").
    tokens: int = 4
    policy: str = "adaptive"

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"draft tokens must be >= 1, got {self.tokens}")
        if self.policy not in DRAFT_POLICIES:
            raise ValueError(f"draft policy must be one of {DRAFT_POLICIES}, got {self.policy!r}")
        if self.source is not None and self.source != NGRAM and not self.source.strip():
            raise ValueError("draft must be 'ngram' or a model NAME@REF")

    @property
    def model(self) -> str | None:
        """The draft model's NAME@REF, or None (no drafter, or prompt lookup)."""
        return self.source if self.source not in (None, NGRAM) else None


_SECTIONS: dict[str, type] = {
    "load": LoadConfig,
    "cache": CacheConfig,
    "engine": EngineConfig,
    "restart": RestartConfig,
    "draft": DraftConfig,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """How to run a model: one section per part that reads it (module docstring)."""

    #: The format of `to_dict`; `from_dict` refuses another.
    VERSION = 1

    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for the engine process, a verdict key or a log line)."""
        out: dict[str, Any] = {"version": self.VERSION}
        for name in _SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """The config `to_dict` wrote. Raises ValueError on another version, an unknown
        section or field, or a bad value."""
        if d.get("version") != cls.VERSION:
            raise ValueError(f"model config version {d.get('version')!r} is not {cls.VERSION}")
        unknown = set(d) - {"version", *_SECTIONS}
        if unknown:
            raise ValueError(f"unknown model config sections: {sorted(unknown)}")
        parts: dict[str, Any] = {}
        for name, kind in _SECTIONS.items():
            values = dict(d.get(name, {}))
            known = {f.name for f in fields(kind)}
            if set(values) - known:
                raise ValueError(f"unknown {name} config fields: {sorted(set(values) - known)}")
            if "backend_plugins" in values:
                values["backend_plugins"] = tuple(values["backend_plugins"])
            parts[name] = kind(**values)
        return cls(**parts)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with fields changed by name, in the section that holds each
        (`replace(max_batch=4, draft_tokens=2)`: `draft_` names the draft section's own
        fields). Raises ValueError for a name no section holds."""
        updates: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            section, name = _owner(key)
            updates.setdefault(section, {})[name] = value
        parts = {
            section: dataclasses.replace(getattr(self, section), **values)
            for section, values in updates.items()
        }
        return dataclasses.replace(self, **parts)

    @classmethod
    def of(cls, **fields_: Any) -> ModelConfig:
        """`ModelConfig().replace(**fields_)`: a config from field names alone."""
        return cls().replace(**fields_)


def _owner(key: str) -> tuple[str, str]:
    """(section, field) for a field name; `draft` and `draft_<field>` are the draft
    section's, `restart_<field>` the restart section's (names the CLI flags use)."""
    if key == "draft":
        return "draft", "source"
    for prefix in ("draft_", "restart_"):
        if key.startswith(prefix):
            section, name = prefix[:-1], key[len(prefix) :]
            if name in {f.name for f in fields(_SECTIONS[section])}:
                return section, name
    owners = [s for s, kind in _SECTIONS.items() if key in {f.name for f in fields(kind)}]
    if len(owners) != 1:
        raise ValueError(f"no model config section has a field {key!r}")
    return owners[0], key
