"""What every command group shares: environment names, flag validators, `--registry` and
`--target` flags, and the usage error `main` turns into exit code 2.

Imports the standard library only, at module level; the registry and the client are
imported inside the functions that open them, so client commands never import torch.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_REGISTRY = "SLIMSERVE_REGISTRY"
ENV_HOME = "SLIMSERVE_HOME"
ENV_TARGET = "SLIMSERVE_TARGET"
ENV_AUTH_TOKEN = "SLIMSERVE_AUTH_TOKEN"
ENV_ADMIN_TOKEN = "SLIMSERVE_ADMIN_TOKEN"
ENV_METRICS_TOKEN = "SLIMSERVE_METRICS_TOKEN"

#: The largest value a protobuf int32/uint32 field takes from every flag that feeds one.
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


class UsageError(Exception):
    """A flag, file or environment value the command cannot use; `main` prints the message
    on one line and exits with code 2, like argparse itself."""


def home() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".slimserve").expanduser()


def default_registry() -> Path:
    """$SLIMSERVE_REGISTRY, else $SLIMSERVE_HOME/registry, else ~/.slimserve/registry."""
    if os.environ.get(ENV_REGISTRY):
        return Path(os.environ[ENV_REGISTRY]).expanduser()
    return home() / "registry"


# ---- flag validators (argparse `type=`: a bad value is "argument --flag: ..." and exit 2) --
def int_range(low: int, high: int) -> Callable[[str], int]:
    """A `type=` for integers in `low..high`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, got {text!r}")
        return value

    return parse


positive_int = int_range(1, INT32_MAX)
non_negative_int = int_range(0, INT32_MAX)
port = int_range(0, 65535)
seed = int_range(0, UINT64_MAX)


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value


def probability(text: str) -> float:
    """A `type=` for a probability in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def positive_int_list(text: str) -> list[int]:
    """A `type=` for a comma-separated list of integers >= 1 ("1,4,16")."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(1 <= v <= INT32_MAX for v in values):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers in 1..{INT32_MAX}, got {text!r}"
        )
    return values


# ---- shared flags ------------------------------------------------------------------------
def registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        type=Path,
        default=None,
        help=f"registry directory (default: ${ENV_REGISTRY}, else $SLIMSERVE_HOME/registry, "
        "else ~/.slimserve/registry)",
    )


def target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=os.environ.get(ENV_TARGET, "127.0.0.1:50051"),
        help="server address HOST:PORT; several, comma-separated, are balanced round-robin "
        f"(default: ${ENV_TARGET} or 127.0.0.1:50051)",
    )
    p.add_argument("--token-file", type=Path, default=None, help="file holding a bearer token")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per call")
    p.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate")
    p.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM client key (mutual TLS)")
    p.add_argument(
        "--allow-insecure-token",
        action="store_true",
        help="send --token-file's token without TLS to a --target that is not this host "
        "(only where the network between is trusted: anyone on the path can read it)",
    )


def backend_args(p: argparse.ArgumentParser, backend_help: str, gguf_help: str) -> None:
    """`--backend` and `--gguf-type` (serve, bench serve)."""
    p.add_argument(
        "--backend", default="auto", choices=["auto", "hf", "llama", "llamacpp"], help=backend_help
    )
    p.add_argument(
        "--gguf-type",
        default="auto",
        choices=["auto", "q8_0", "q4_1", "f16", "f32"],
        help=gguf_help,
    )


def kv_layout_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    """`--kv-layout` (serve, bench serve, bench step)."""
    from slimserve.engine.config import KV_LAYOUTS

    p.add_argument("--kv-layout", choices=KV_LAYOUTS, default=KV_LAYOUTS[0], help=help_text)


def check_pair(args: argparse.Namespace, cert: str, key: str) -> None:
    """Refuse one of two flags that only work together (a certificate and its key)."""
    if bool(getattr(args, cert)) != bool(getattr(args, key)):
        flags = (f"--{cert.replace('_', '-')}", f"--{key.replace('_', '-')}")
        raise UsageError(f"{flags[0]} and {flags[1]} go together: give both or neither")


def read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def open_registry(args: argparse.Namespace) -> Any:
    from slimserve.registry.store import Registry

    return Registry(args.registry or default_registry())


def client(args: argparse.Namespace) -> Any:
    """The `Client` that `--target`, `--token-file`, `--timeout`, `--tls-*` and
    `--allow-insecure-token` describe.

    Raises UsageError, before any connection, for a token that would cross the network to
    another host in plaintext without `--allow-insecure-token`."""
    from slimserve.clients import Client, InsecureToken
    from slimserve.clients.client import tls_credentials

    check_pair(args, "tls_cert", "tls_key")
    token = None
    if args.token_file is not None:
        token = read_text(args.token_file, "--token-file").strip()
        if not token:
            raise UsageError(f"--token-file {args.token_file} is empty: write the token in it")
    credentials = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        try:
            credentials = tls_credentials(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
        except OSError as exc:
            raise UsageError(f"--tls-*: cannot read {exc.filename}: {exc.strerror}") from None
    try:
        return Client(
            args.target,
            timeout=args.timeout,
            token=token,
            credentials=credentials,
            allow_insecure_token=args.allow_insecure_token,
        )
    except InsecureToken:
        raise UsageError(
            f"refusing to send the --token-file token without TLS to {args.target!r}, which "
            "is not this host: add --tls-ca, or --allow-insecure-token if the network between "
            "is trusted"
        ) from None
