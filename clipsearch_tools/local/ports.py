"""Ports for the local stack's servers, chosen where no outgoing connection can take them first."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000  # below this sit the ports services commonly default to
_LOOPBACK = "127.0.0.1"


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel gives outgoing connections (and `bind(0)`): Linux's setting, else its default."""
    try:
        low, high = (int(field) for field in _EPHEMERAL_RANGE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now, below the kernel's ephemeral range when it leaves room.

    A port the kernel picks is an ephemeral one: until a server binds it, any outgoing connection on the
    machine may take it. Below that range only another explicit bind can.
    """
    low, _ = ephemeral_range()
    chosen: list[int] = []
    if low > _LOWEST:
        for port in random.sample(range(_LOWEST, low), low - _LOWEST):
            if _bindable(port):
                chosen.append(port)
                if len(chosen) == count:
                    return chosen
    while len(chosen) < count:  # no room below the ephemeral range: let the kernel pick
        with socket.socket() as sock:
            sock.bind((_LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in chosen:
            chosen.append(port)
    return chosen


def free_port() -> int:
    """One port free on 127.0.0.1 now, as `free_ports` chooses them."""
    return free_ports(1)[0]


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((_LOOPBACK, port))
        except OSError:
            return False
    return True
