"""The web page's proxy over real HTTP: what it forwards (and signs), what it refuses, and how it fails.

The API behind it is a recording HTTP server standing in for API Gateway (AWS); the page against the real
local stack is tested in tests/e2e/test_ui_browser.py.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from clipsearch_tools.client import ClipsearchClient, Target
from clipsearch_tools.local.ports import free_port
from clipsearch_tools.ui.server import MAX_BODY_BYTES, UiServer

pytestmark = pytest.mark.unit


class _RecordingApi(ThreadingHTTPServer):
    """Answers every request with `answer` and keeps (method, path, headers, body) of each."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.answer = (200, b'{"datasets": []}')
        super().__init__(("127.0.0.1", 0), _RecordingHandler)


class _RecordingHandler(BaseHTTPRequestHandler):
    server: _RecordingApi

    def _record(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        status, payload = self.server.answer
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _record

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


def _serve(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def api() -> Iterator[_RecordingApi]:
    server = _RecordingApi()
    _serve(server)
    yield server
    server.shutdown()
    server.server_close()


def _ui(target: Target) -> Iterator[UiServer]:
    server = UiServer(ClipsearchClient(target), port=0)
    _serve(server)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def local_ui(api: _RecordingApi) -> Iterator[UiServer]:
    yield from _ui(Target(f"http://127.0.0.1:{api.server_address[1]}", "bucket", "us-east-1"))


def _call(ui: UiServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", ui.server_address[1], timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_forwards_the_page_routes_with_query_string_body_and_the_apis_own_status(local_ui, api):
    body = json.dumps({"query": "a red star", "k": 20, "offset": 20}).encode()
    api.answer = (400, b'{"error": {"code": "invalid_min_score", "message": "min_score: too big"}}')
    status, headers, payload = _call(local_ui, "POST", "/api/datasets/my%20photos/search/text?thumbnails=true&presign=true",
                                     body, {"content-type": "application/json"})
    assert (status, headers["content-type"], payload) == (400, "application/json", api.answer[1])
    method, path, forwarded_headers, forwarded_body = api.requests[-1]
    assert (method, path, forwarded_body) == ("POST", "/datasets/my%20photos/search/text?thumbnails=true&presign=true", body)
    assert forwarded_headers["content-type"] == "application/json"
    assert "authorization" not in forwarded_headers  # the local stack is not signed for

    api.answer = (200, b'{"datasets": []}')
    assert _call(local_ui, "GET", "/api/datasets")[::2] == (200, b'{"datasets": []}')
    image = b"\xff\xd8\xff\xe0 a JPEG's first bytes"
    assert _call(local_ui, "POST", "/api/datasets/d/search/image?k=3", image, {"content-type": "image/jpeg"})[0] == 200
    assert api.requests[-1][1:4:2] == ("/datasets/d/search/image?k=3", image)


def test_signs_for_a_deployed_api_with_the_users_credentials(api, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    target = Target(f"http://127.0.0.1:{api.server_address[1]}", "", "eu-west-1", sign_requests=True)
    for ui in _ui(target):
        assert _call(ui, "POST", "/api/datasets/d/search/text", b'{"query": "x"}',
                     {"content-type": "application/json"})[0] == 200
    headers = api.requests[-1][2]
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/execute-api/aws4_request" in headers["authorization"]
    assert "x-amz-date" in headers


@pytest.mark.parametrize(("method", "path"), [
    ("DELETE", "/api/datasets/photos"),
    ("PUT", "/api/datasets/photos"),
    ("POST", "/api/datasets"),
    ("GET", "/api/datasets/photos/search/text"),
    ("GET", "/api/admin"),
    ("GET", "/api/datasets/photos/../../admin"),
    ("GET", "/api/datasets/a/b/c"),
    ("GET", "/api//evil.example/datasets"),
    ("GET", "/api/datasets?x=<script>"),
])
def test_refuses_what_the_page_does_not_use_without_calling_the_api(local_ui, api, method, path):
    status, headers, payload = _call(local_ui, method, path, b"{}" if method in ("POST", "PUT") else None,
                                     {"content-type": "application/json"})
    assert status in (404, 405), (status, payload)
    assert json.loads(payload)["error"]["code"] in ("not_forwarded", "method_not_allowed")
    assert api.requests == []


def test_refuses_other_hosts_and_origins_and_unexpected_bodies(local_ui, api):
    port = local_ui.server_address[1]
    assert _call(local_ui, "GET", "/api/datasets", headers={"host": f"attacker.example:{port}"})[0] == 403
    assert _call(local_ui, "GET", "/", headers={"host": "attacker.example"})[0] == 403
    origin = {"origin": "http://attacker.example", "content-type": "application/json"}
    assert _call(local_ui, "POST", "/api/datasets/d/search/text", b"{}", origin)[0] == 403
    same_origin = {"origin": f"http://localhost:{port}", "host": f"localhost:{port}", "content-type": "application/json"}
    assert _call(local_ui, "POST", "/api/datasets/d/search/text", b"{}", same_origin)[0] == 200
    assert _call(local_ui, "POST", "/api/datasets/d/search/text", b"query=x",
                 {"content-type": "application/x-www-form-urlencoded"})[0] == 415
    assert len(api.requests) == 1


def test_a_body_over_the_limit_is_refused_before_it_is_read(local_ui, api):
    connection = http.client.HTTPConnection("127.0.0.1", local_ui.server_address[1], timeout=10)
    connection.putrequest("POST", "/api/datasets/d/search/image")
    connection.putheader("content-type", "image/jpeg")
    connection.putheader("content-length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    connection.close()
    assert (response.status, error["code"]) == (413, "body_too_large")
    assert f"{MAX_BODY_BYTES:,}" in error["message"]
    assert api.requests == []


def test_an_unreachable_api_is_a_502_naming_it():
    nobody = f"http://127.0.0.1:{free_port()}"
    for ui in _ui(Target(nobody, "bucket", "us-east-1")):
        status, _, payload = _call(ui, "GET", "/api/datasets")
    error = json.loads(payload)["error"]
    assert (status, error["code"]) == (502, "api_unreachable")
    assert nobody in error["message"]


def test_serves_the_page_with_a_policy_that_allows_no_inline_script(local_ui):
    status, headers, page = _call(local_ui, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'<script src="app.js" defer></script>' in page
    policy = headers["content-security-policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy
    for asset, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        status, headers, body = _call(local_ui, "GET", asset)
        assert (status, headers["content-type"].split(";")[0]) == (200, kind) and body
    assert _call(local_ui, "GET", "/static/../server.py")[0] == 404
