"""Lazy: a value built once, on first use or started in the background, however many threads ask for it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Lazy(Generic[T]):
    """Builds a value on first use, once, even when concurrent requests ask for it together."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._building: Future | None = None

    @property
    def ready(self) -> bool:
        return self._value is not None

    def start(self, executor: ThreadPoolExecutor) -> None:
        """Begins building on `executor` unless built or begun already (a failed build begins again)."""
        with self._start_lock:
            if self._value is not None or (self._building is not None and not self._building.done()):
                return
            self._building = executor.submit(self.get)
            self._building.add_done_callback(_log_failed_build)

    def get(self) -> T:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._build()
        return self._value


def _log_failed_build(build: Future) -> None:
    """A background build's error is raised again to the request that needs the value; this logs it early."""
    if build.exception() is not None:
        logger.warning("building in the background failed: %s", build.exception())
