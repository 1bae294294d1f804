"""Ports for the local stack's servers, chosen where no outgoing connection can take them first."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000  # below this sit the well-known and registered ports other software expects to own
_TRIES = 200


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel gives outgoing connections (and `bind(0)`): Linux's setting, else its default."""
    try:
        low, high = (int(field) for field in _EPHEMERAL_RANGE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` now, below the kernel's ephemeral range where there is room.

    A port the kernel picks is an ephemeral one, so until the server binds it any outgoing connection on
    the machine may take it, the server's own among them: `weed mini` dials its master and filer before
    it binds its last ports, and exits when one is gone. Below that range only another explicit bind can
    take a port, and the server's start retries then.
    """
    low, _ = ephemeral_range()
    chosen: list[int] = []
    candidates = random.sample(range(_LOWEST, low), min(_TRIES, low - _LOWEST)) if low > _LOWEST else []
    for port in candidates:
        if len(chosen) == count:
            break
        if port not in chosen and _bindable(host, port):
            chosen.append(port)
    while len(chosen) < count:  # no room below the ephemeral range: let the kernel pick
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in chosen:
            chosen.append(port)
    return chosen


def free_port(host: str = "127.0.0.1") -> int:
    """One port free on `host` now, as `free_ports` chooses them."""
    return free_ports(1, host)[0]


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
