"""The local stack's port choice: free ports below the kernel's ephemeral range, distinct within a call."""

from __future__ import annotations

import socket

import pytest
from clipsearch_tools.local import ports

pytestmark = pytest.mark.unit


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    low, _ = ports.ephemeral_range()
    if low <= 10_010:
        pytest.skip(f"this machine's ephemeral range starts at {low}: no room below it")
    chosen = ports.free_ports(10)
    assert len(set(chosen)) == 10
    assert all(10_000 <= port < low for port in chosen)
    for port in chosen:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_chosen(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setattr(ports.random, "sample", lambda population, count: [taken, taken + 1, taken + 2])
        chosen = ports.free_ports(1)
    assert chosen != [taken]


def test_with_no_room_below_the_ephemeral_range_the_kernel_picks(tmp_path, monkeypatch):
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", setting)
    monkeypatch.setattr(ports.random, "sample", lambda *_: pytest.fail("sampled below a range starting at 1024"))
    assert ports.ephemeral_range() == (1024, 65535)
    chosen = ports.free_ports(3)
    assert len(set(chosen)) == 3


def test_an_unreadable_setting_falls_back_to_linux_default(tmp_path, monkeypatch):
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", tmp_path / "missing")
    assert ports.ephemeral_range() == (32768, 60999)
