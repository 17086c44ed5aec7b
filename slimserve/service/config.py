"""The server's configuration: built once from flags/environment by the CLI, passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Backend = Literal["auto", "hf", "llama"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-request limits; each exceeded one is an INVALID_ARGUMENT naming it."""

    max_new_tokens: int = 2048
    default_max_new_tokens: int = 128
    #: Prompt tokens at most (also capped by the model's context).
    max_prompt_tokens: int = 4096
    max_stop_sequences: int = 16
    max_stop_sequence_chars: int = 256
    max_top_n: int = 20
    max_labels: int = 32
    max_message_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "default_max_new_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """How to run a model: device, dtype, batch and context sizes, backend."""

    device: str = "auto"
    dtype: Dtype = "auto"
    backend: Backend = "auto"
    #: Concurrent sequences per model (KV-cache slots).
    max_batch: int = 16
    #: Longest prompt + generation per sequence; 0 = the model's own limit, capped at 4096.
    max_seq_len: int = 0
    #: Requests waiting for a slot beyond this get RESOURCE_EXHAUSTED.
    max_queue: int = 64
    #: Warm-up generation before reporting SERVING.
    warmup: bool = True

    def __post_init__(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_seq_len < 0:
            raise ValueError(f"max_seq_len must be >= 0, got {self.max_seq_len}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    registry: Path
    #: Model refs ("name", "name@3", "name@production") loaded at start; the first is default.
    models: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 50051
    model: ModelConfig = field(default_factory=ModelConfig)
    limits: Limits = field(default_factory=Limits)
    #: torch intra-op threads; 0 = leave torch's default.
    threads: int = 0
    #: Seconds in-flight requests get to finish on shutdown.
    grace_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one --model is required")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
