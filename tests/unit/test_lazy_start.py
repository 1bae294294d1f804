"""Lazy.start: a value built in the background once, however many requests ask for it during a cold start."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from clipsearch.lazy import Lazy


def test_starting_twice_builds_once_and_get_waits_for_the_background_build():
    release = threading.Event()
    builds = []

    def build() -> str:
        builds.append(threading.current_thread().name)
        release.wait(5)
        return "session"

    lazy = Lazy(build)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="warm-up") as pool:
        lazy.start(pool)
        lazy.start(pool)  # a second request during the cold start
        assert not lazy.ready
        release.set()
        assert lazy.get() == "session"
    assert len(builds) == 1 and builds[0].startswith("warm-up")
    assert lazy.ready


def test_a_failed_background_build_leaves_nothing_cached_and_is_started_again():
    attempts = []

    def build() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("model fetch failed")
        return "session"

    lazy = Lazy(build)
    with ThreadPoolExecutor(max_workers=1) as pool:
        lazy.start(pool)
        pool.submit(lambda: None).result()  # the failed build has finished
        assert not lazy.ready
        lazy.start(pool)
        pool.submit(lambda: None).result()
    assert lazy.ready and lazy.get() == "session"
    assert len(attempts) == 2
