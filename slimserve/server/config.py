"""The server's configuration: built once from flags/environment by the CLI, passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimserve.engine.config import ModelConfig


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
    #: Serialized request size at most; larger ones (up to a hard transport cap of
    #: `transport_message_bytes`) get INVALID_ARGUMENT, beyond that gRPC refuses them.
    max_message_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in (
            "max_new_tokens",
            "default_max_new_tokens",
            "max_prompt_tokens",
            "max_labels",
            "max_stop_sequence_chars",
            "max_message_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_stop_sequences", "max_top_n"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")

    @property
    def transport_message_bytes(self) -> int:
        """gRPC's own receive limit: room above `max_message_bytes` to answer it by name."""
        return max(2 * self.max_message_bytes, self.max_message_bytes + (1 << 20))


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """Bearer tokens. No tokens at all = no authentication (loopback development).

    `tokens` open the generation and read-only model RPCs; `admin_tokens` open everything,
    including LoadModel/UnloadModel. With user tokens but no admin token, model control is
    refused to everyone. Tokens are kept out of `repr` so they never reach a log.
    """

    tokens: frozenset[str] = field(default=frozenset(), repr=False)
    admin_tokens: frozenset[str] = field(default=frozenset(), repr=False)

    def __post_init__(self) -> None:
        for token in self.tokens | self.admin_tokens:
            if not token or len(token) < 16 or any(c.isspace() for c in token):
                raise ValueError(
                    "a bearer token must be at least 16 characters without whitespace "
                    "(e.g. `openssl rand -hex 32`)"
                )

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.admin_tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """Server certificate and key (PEM); with `client_ca`, clients must present a
    certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls {name} file {path} does not exist")


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
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig | None = None
    #: Prometheus metrics over HTTP on `host`; None = off, 0 = any free port.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one --model is required")
        for name in ("port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be 0..65535, got {port}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
