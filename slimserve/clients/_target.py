"""Where a client connects: the channel target and options, and whether that is this host.

Imports only the standard library; `slimserve.clients` builds channels from these.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, Final

MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024

# Name-resolver schemes whose addresses never leave this host.
_LOCAL_SCHEMES: Final = ("unix:", "unix-abstract:")


def channel_target(target: str | Sequence[str]) -> tuple[str, list[tuple[str, Any]]]:
    """A channel target and options; several addresses are balanced round-robin."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    targets = addresses(target)
    if len(targets) == 1:
        if targets[0].startswith("dns:"):
            # A DNS name with several A records (a Kubernetes headless Service): spread calls
            # over every replica instead of pinning the first (gRPC's default, pick_first).
            options.append(("grpc.lb_policy_name", "round_robin"))
        return targets[0], options
    options.append(("grpc.lb_policy_name", "round_robin"))
    return "ipv4:" + ",".join(targets), options


def addresses(target: str | Sequence[str]) -> list[str]:
    """The addresses in `target`: a comma-separated string, or a sequence of them."""
    if isinstance(target, str):
        return [t.strip() for t in target.split(",") if t.strip()]
    return list(target)


def is_loopback(target: str | Sequence[str]) -> bool:
    """Whether every address of `target` is this host: 127.0.0.0/8, ::1, `localhost` or a
    Unix socket. An address this cannot read counts as remote."""
    hosts = [h for a in addresses(target) for h in _hosts(a)]
    return bool(hosts) and all(_is_loopback_host(h) for h in hosts)


def _hosts(address: str) -> list[str]:
    """The host part of each address in one gRPC target (`localhost` for a Unix socket)."""
    if address.startswith(_LOCAL_SCHEMES):
        return ["localhost"]
    if address.startswith(("ipv4:", "ipv6:")):
        return [_host(a) for a in address.split(":", 1)[1].split(",")]
    if address.startswith("dns:"):
        # dns:[//authority/]host[:port]; the authority names the DNS server, not the peer.
        rest = address.removeprefix("dns:")
        return [_host(rest.split("/", 3)[-1] if rest.startswith("//") else rest)]
    return [_host(address)]


def _host(address: str) -> str:
    if address.startswith("["):  # [v6]:port
        return address[1 : address.find("]")] if "]" in address else address
    if address.count(":") == 1:  # host:port
        return address.split(":", 1)[0]
    return address  # a bare host, or a bare IPv6 address


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
