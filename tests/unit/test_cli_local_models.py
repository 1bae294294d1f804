"""The local stack probes the model hub before a download, so an offline first start falls back at once."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from clipsearch_tools.local.models import hub_reachable
from clipsearch_tools.local.ports import free_port

pytestmark = pytest.mark.unit


class _NotFound(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_hub_that_answers_even_with_an_error_status_is_reachable(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_reachable() is True
    finally:
        server.shutdown()
        server.server_close()


def test_a_hub_nobody_listens_for_is_unreachable_within_the_probe_timeout(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    assert hub_reachable(timeout=3) is False
    assert time.monotonic() - started < 3.5
