"""The server's configuration: built once from flags/environment by the CLI, passed down."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

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
    #: Completions one request may ask for (OpenAI's `n`).
    max_n: int = 16
    #: Serialized request size at most; larger ones (up to a hard transport cap of
    #: `transport_message_bytes`) get INVALID_ARGUMENT, beyond that gRPC refuses them.
    max_message_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in (
            "max_new_tokens",
            "default_max_new_tokens",
            "max_prompt_tokens",
            "max_labels",
            "max_n",
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


#: The largest duration a gRPC channel argument holds: milliseconds in a C int.
_MAX_OPTION_S = (2**31 - 1) / 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class Connections:
    """Per-connection transport limits, applied as grpc.aio server options.

    A client that opens many streams on one connection waits for a free one beyond
    `max_concurrent_streams` (HTTP/2 flow control, not an error). `max_connection_age_s`
    makes long-lived clients reconnect now and then (so a load balancer can spread them
    again); after it, in-flight calls get `max_connection_age_grace_s` to finish before
    the connection is closed under them. Keepalive pings find peers that vanished without
    closing their connection, whose streams would otherwise hold engine slots.
    """

    #: Streams open at once on one connection; further ones wait for one to end.
    max_concurrent_streams: int = 128
    #: Seconds a connection lives before the server asks the client to reconnect; 0 = no
    #: limit. gRPC spreads it by +-10% so clients do not all reconnect together.
    max_connection_age_s: float = 0.0
    #: Seconds in-flight calls keep running after `max_connection_age_s` (ignored when 0).
    max_connection_age_grace_s: float = 30.0
    #: Seconds between the server's keepalive pings on a connection.
    keepalive_time_s: float = 60.0
    #: Seconds the server waits for a ping's answer before closing the connection.
    keepalive_timeout_s: float = 20.0
    #: The shortest interval between a client's pings the server accepts; a client pinging
    #: more often is sent GOAWAY (gRPC's "too many pings").
    min_client_ping_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_concurrent_streams <= 2**31 - 1:
            raise ValueError(
                f"max_concurrent_streams must be in 1..{2**31 - 1}, "
                f"got {self.max_concurrent_streams}"
            )
        may_be_zero = (
            "max_connection_age_s",
            "max_connection_age_grace_s",
            "min_client_ping_interval_s",
        )
        for name in may_be_zero:
            value = getattr(self, name)
            if not 0 <= value <= _MAX_OPTION_S:  # NaN fails too
                raise ValueError(f"{name} must be in 0..{_MAX_OPTION_S:.0f} s, got {value}")
        for name in ("keepalive_time_s", "keepalive_timeout_s"):
            value = getattr(self, name)
            if not 0.001 <= value <= _MAX_OPTION_S:
                raise ValueError(f"{name} must be in 0.001..{_MAX_OPTION_S:.0f} s, got {value}")

    def grpc_options(self) -> list[tuple[str, int]]:
        """The `grpc.aio.server(options=...)` entries these limits become."""
        options = [
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout_s)),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.min_client_ping_interval_s)),
        ]
        if self.max_connection_age_s > 0:
            options += [
                ("grpc.max_connection_age_ms", _ms(self.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace_s)),
            ]
        return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpTransport:
    """What the OpenAI-compatible HTTP door accepts before a route sees a request
    (`server.openai.guard`): who may address it, how fast a client must send, how many
    connections may be open."""

    #: Host names (beyond loopback names and IP literals, always allowed) a request's `Host`
    #: may carry: exact names or `*.suffix`; `*` allows any (DNS rebinding protection off).
    allowed_hosts: tuple[str, ...] = ()
    #: Origins whose pages may call the door (CORS); empty = CORS off.
    cors_origins: tuple[str, ...] = ()
    #: Seconds a request's headers may take to arrive, from the connection's start or the
    #: previous response's end; then 408 and the connection closes.
    header_timeout_s: float = 10.0
    #: Seconds a request's body may take to arrive once its headers are in; then 408.
    body_timeout_s: float = 60.0
    #: Seconds an idle kept-alive connection stays open between requests.
    idle_timeout_s: float = 5.0
    #: Open connections at most; one more is answered 503 and closed.
    max_connections: int = 512
    #: Bytes of request line and headers at most (431 beyond).
    max_header_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not 0 < value <= 86400:  # NaN fails too
                raise ValueError(f"{name} must be in (0, 86400] s, got {value}")
        if self.max_connections < 1 or self.max_header_bytes < 1024:
            raise ValueError(
                "max_connections must be >= 1 and max_header_bytes >= 1024, got "
                f"{self.max_connections} and {self.max_header_bytes}"
            )
        for host in self.allowed_hosts:
            if not host or any(c.isspace() or c in "/@:" for c in host):
                raise ValueError(f"allowed host {host!r} must be a bare name, *.suffix or *")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"CORS origin {origin!r} must be http(s)://host[:port] or *")


#: The principal the access log names for a call that presented no valid token.
ANONYMOUS = "anonymous"
#: A token's label in the access log: a letter, then letters, digits, `.`, `_` or `-`.
TOKEN_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


def parse_tokens(text: str, role: str) -> dict[str, str]:
    """`{token: label}` from the lines of a token file.

    Each line is `TOKEN`, `LABEL:TOKEN` or `LABEL TOKEN`; blank lines and lines starting
    with `#` are skipped. A token without a label is named `{role}-N`, N counting the
    token lines from 1. Raises ValueError naming the line of a malformed one (never
    quoting it: it may be a token).
    """
    out: dict[str, str] = {}
    count = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        count += 1
        parts = line.split()
        head, colon, tail = line.partition(":")
        if len(parts) == 2:
            label, token = parts
        elif len(parts) == 1 and colon and TOKEN_LABEL.fullmatch(head):
            label, token = head, tail
        elif len(parts) == 1:
            label, token = f"{role}-{count}", line
        else:
            raise ValueError(f"line {lineno}: expected TOKEN, LABEL:TOKEN or LABEL TOKEN")
        if not TOKEN_LABEL.fullmatch(label):
            raise ValueError(
                f"line {lineno}: the label must start with a letter and hold only letters, "
                "digits, '.', '_' or '-' (64 at most)"
            )
        if token in out:
            raise ValueError(f"line {lineno}: this token is already on an earlier line")
        out[token] = label
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """Bearer tokens. No tokens at all = no authentication (loopback development).

    `tokens` open the generation and read-only model RPCs; `admin_tokens` open everything,
    including LoadModel/UnloadModel. Without an admin token, model control is refused to
    everyone unless `ServerConfig.allow_model_control` is set. Tokens are kept out of `repr`
    so they never reach a log; the access log names a caller by its token's label.
    """

    tokens: frozenset[str] = field(default=frozenset(), repr=False)
    admin_tokens: frozenset[str] = field(default=frozenset(), repr=False)
    #: token -> its label in the access log (`TOKEN_LABEL`, unique). A token without one
    #: is named by its role and the first 8 hex digits of its SHA-256 (`user-1a2b3c4d`).
    labels: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)

    def __post_init__(self) -> None:
        for token in self.tokens | self.admin_tokens:
            if not token or len(token) < 16 or any(c.isspace() for c in token):
                raise ValueError(
                    "a bearer token must be at least 16 characters without whitespace "
                    "(e.g. `openssl rand -hex 32`)"
                )
        if not set(self.labels) <= self.tokens | self.admin_tokens:
            raise ValueError("labels name a token that is in neither tokens nor admin_tokens")
        seen: set[str] = set()
        for label in self.labels.values():
            if not TOKEN_LABEL.fullmatch(label) or label == ANONYMOUS:
                raise ValueError(
                    f"token label {label!r} must start with a letter, hold only letters, "
                    f"digits, '.', '_' or '-' (64 at most), and not be {ANONYMOUS!r}"
                )
            if label in seen:
                raise ValueError(f"token label {label!r} is used twice: give each its own")
            seen.add(label)
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.admin_tokens)

    def label_of(self, token: str) -> str:
        """The access-log name of a configured token (never the token itself)."""
        label = self.labels.get(token)
        if label is not None:
            return label
        role = "admin" if token in self.admin_tokens else "user"
        return f"{role}-{hashlib.sha256(token.encode()).hexdigest()[:8]}"


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
    connections: Connections = field(default_factory=Connections)
    #: torch intra-op threads; 0 = leave torch's default.
    threads: int = 0
    #: Seconds in-flight requests get to finish on shutdown.
    grace_s: float = 10.0
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig | None = None
    #: Prometheus metrics over HTTP on `metrics_host`; None = off, 0 = any free port.
    metrics_port: int | None = None
    #: Where metrics listen: loopback unless asked (they name models and their load).
    metrics_host: str = "127.0.0.1"
    #: A bearer token a scrape must present (`Authorization: Bearer ...`); None = none. The
    #: exporter speaks plain HTTP: off loopback, keep its port inside a trusted network.
    metrics_token: str | None = field(default=None, repr=False)
    #: The OpenAI-compatible HTTP door on `host` (docs/openai.md); None = off, 0 = any free
    #: port. Same tokens, TLS, limits and engines as gRPC.
    http_port: int | None = None
    #: The HTTP door's transport limits: Host allow-list, CORS, timeouts, connection cap.
    http: HttpTransport = field(default_factory=HttpTransport)
    #: Without admin tokens, let every caller that may generate also load and unload models
    #: (development). False: model control needs an admin token.
    allow_model_control: bool = False
    #: Accept bearer tokens on a non-loopback `host` without TLS, where they cross the
    #: network in plaintext (a warning is logged at start). False: refuse to start so.
    allow_insecure_tokens: bool = False
    #: Where qualification verdicts are kept; None: `<registry>/.qualify/verdicts.json`. A
    #: read-only version directory (`serve --model-dir`) keeps them elsewhere.
    qualify_cache: Path | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one --model is required")
        for name in ("port", "metrics_port", "http_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be 0..65535, got {port}")
        fixed = [p for p in (self.port, self.metrics_port, self.http_port) if p]
        if len(fixed) != len(set(fixed)):
            raise ValueError(
                f"port, metrics_port and http_port must differ, got {self.port}, "
                f"{self.metrics_port} and {self.http_port}"
            )
        if self.metrics_token is not None and (
            len(self.metrics_token) < 16 or any(c.isspace() for c in self.metrics_token)
        ):
            raise ValueError("the metrics token must be at least 16 characters without whitespace")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.allow_model_control and self.auth.admin_tokens:
            raise ValueError(
                "allow_model_control would open model control to non-admin callers although "
                "admin tokens are set: drop --allow-model-control (admins control models)"
            )
        if self.plaintext_tokens and not self.allow_insecure_tokens:
            raise ValueError(
                f"bearer tokens on host {self.host!r} without TLS cross the network in "
                "plaintext: add --tls-cert and --tls-key, bind a loopback --host, or accept "
                "the risk with --allow-insecure-tokens"
            )

    @property
    def plaintext_tokens(self) -> bool:
        """Whether bearer tokens would travel unencrypted beyond this machine."""
        return self.auth.enabled and self.tls is None and not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (`127.0.0.0/8`, `::1`); False for any
    other name or address, including the wildcard `0.0.0.0` / `[::]`."""
    bare = host.strip().removeprefix("[").removesuffix("]")
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False
