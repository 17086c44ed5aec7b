"""The `slimserve` command. Flags and environment are read here, and only here.

One module per command group adds its subcommands (`add_parser`): `registry` (import,
registry), `compress` (compress, eval), `serve`, `qualify`, `client` (generate, models,
score, health), `bench`, and `fraud`; `common` holds the shared flags and validators. Every
handler imports what it needs when it runs, so importing this package (and running the
client commands) never imports torch. A bad flag value is one line on stderr and exit
code 2, from argparse or from `UsageError`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from slimserve.cli import bench, client, compress, qualify, registry, serve
from slimserve.cli.common import UsageError, default_registry, registry_arg, target_arg
from slimserve.cli.serve import serve_config

__all__ = ["UsageError", "build_parser", "default_registry", "main", "serve_config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="log lines on stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    registry.add_parser(sub)
    compress.add_parser(sub)
    serve.add_parser(sub)
    qualify.add_parser(sub)
    client.add_parser(sub)
    bench.add_parser(sub)
    from slimserve.cli.fraud import add_fraud_commands

    add_fraud_commands(sub, registry_arg, target_arg)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from slimserve.server import logs  # stdlib only: client commands stay torch-free

    logs.configure(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except UsageError as exc:
        print(f"slimserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from slimserve.clients.errors import ClientError

        if isinstance(exc, ClientError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            from slimserve.compression.errors import CompressionError
            from slimserve.registry.errors import RegistryError
        except ImportError:  # pragma: no cover
            raise exc from None
        if isinstance(exc, CompressionError | RegistryError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
