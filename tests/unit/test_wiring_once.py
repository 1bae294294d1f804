"""wiring.once: an execution environment's adapters and services are built once, even when threads ask together."""

from __future__ import annotations

import threading
import time

import pytest
from clipsearch.wiring import once

pytestmark = pytest.mark.unit


def test_callers_during_the_build_wait_for_it_and_share_the_one_instance() -> None:
    building, release = threading.Event(), threading.Event()
    builds = []

    @once
    def get_service() -> object:
        builds.append(threading.current_thread().name)
        building.set()
        release.wait(5)
        return object()

    got: list[object] = []
    first = threading.Thread(target=lambda: got.append(get_service()), name="init")
    first.start()
    assert building.wait(5)
    others = [threading.Thread(target=lambda: got.append(get_service())) for _ in range(3)]
    for thread in others:
        thread.start()
    time.sleep(0.05)  # the others are inside get_service now (plain lru_cache would build for each)
    release.set()
    for thread in [first, *others]:
        thread.join(5)

    assert builds == ["init"]
    assert len(got) == 4 and all(instance is got[0] for instance in got)


def test_a_failed_build_is_not_cached_and_cache_clear_forgets_the_instance() -> None:
    attempts = []

    @once
    def get_client() -> object:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("endpoint unreachable")
        return object()

    with pytest.raises(OSError):
        get_client()
    built = get_client()
    assert get_client() is built and get_client.cache_info().currsize == 1 and len(attempts) == 2
    get_client.cache_clear()
    assert get_client() is not built and len(attempts) == 3
