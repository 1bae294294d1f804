"""The search function's init phase: the text model and the search service with its catalog connection are
ready before the first request, and the GIL switch interval it shortens and the garbage collector it pauses
meanwhile are restored."""

from __future__ import annotations

import gc
import sys
import threading

import pytest
from clipsearch import wiring
from search_stack import SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration

INIT_THREADS = ("init-text-model", "init-catalog")


def wait_for_init() -> None:
    for thread in threading.enumerate():
        if thread.name in INIT_THREADS:
            thread.join(60)
            assert not thread.is_alive(), f"{thread.name} still running after 60 s"


def test_init_readies_the_text_model_and_the_service_then_restores_the_switch_interval(
    stack: SearchStack, seed_eval_photos
) -> None:
    normal_interval = 0.005  # CPython's default, which the test process keeps
    assert wiring.STARTING_SWITCH_INTERVAL_S < normal_interval
    wait_for_init()  # started as the stack fixture imported the search function

    assert sys.getswitchinterval() == pytest.approx(normal_interval)
    assert gc.isenabled() and gc.get_freeze_count() > 0  # what init built is out of the collector's way
    assert wiring.get_search_text_encoder().ready
    assert wiring.get_search_service.cache_info().currsize == 1
    service = wiring.get_search_service()
    stack.index("photos", seed_eval_photos[:3])
    status, body = stack.call(stack.search, "search_text", dataset="photos", body={"query": "a dog", "k": 2})
    assert status == 200 and len(body["results"]) == 2
    assert wiring.get_search_service() is service  # the request used the service init built
    assert wiring.get_search_service.cache_info().misses == 1


def test_init_failures_are_left_to_the_first_request(stack: SearchStack, monkeypatch, caplog) -> None:
    """A catalog that cannot be reached during init is logged; the first request reports it as a 503."""
    wait_for_init()
    wiring.get_database().close()
    monkeypatch.setenv("CLIPSEARCH_DATABASE_URL", "postgresql://clipsearch@127.0.0.1:1/nowhere?connect_timeout=2")
    for factory in vars(wiring).values():
        if hasattr(factory, "cache_clear"):
            factory.cache_clear()
    with caplog.at_level("WARNING", logger="clipsearch.wiring"):
        wiring.start_search_function()
        wait_for_init()
    assert "opening the catalog during init failed" in caplog.text
    assert sys.getswitchinterval() == pytest.approx(0.005) and gc.isenabled()
    status, body = stack.call(stack.search, "search_text", dataset="photos", body={"query": "a dog"})
    assert status == 503 and body["error"]["code"] == "unavailable"


def test_a_second_start_during_the_first_still_restores_the_normal_interval(stack: SearchStack) -> None:
    wiring.start_search_function()  # the stack fixture's import started one already
    wiring.start_search_function()
    wait_for_init()
    assert sys.getswitchinterval() == pytest.approx(0.005) and gc.isenabled()
