"""Serves the search page on 127.0.0.1 and forwards its /api/ calls to one clipsearch HTTP API (signed when deployed).

The `kubectl proxy` pattern: a browser cannot sign SigV4, so this process signs with the user's credentials.
It is therefore no open proxy: only the API's read and search routes, only to the configured API, only for
pages served from this address (Host and Origin are checked, so another site cannot drive it from the browser).
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from clipsearch_tools.client import ClipsearchClient, StackUnreachable

DEFAULT_PORT = 8765
# API Gateway's payload limit and the local gateway's body limit: a bigger query image cannot reach the API anyway.
MAX_BODY_BYTES = 10 * 1024 * 1024
API_PREFIX = "/api"

_SEGMENT = r"[A-Za-z0-9._~%!$&'()*+,;=:@-]+"
_FORWARDED_ROUTES = (
    ("GET", re.compile(r"/datasets")),
    ("GET", re.compile(rf"/datasets/{_SEGMENT}")),
    ("GET", re.compile(rf"/datasets/{_SEGMENT}/duplicates")),
    ("POST", re.compile(rf"/datasets/{_SEGMENT}/search/(text|image)")),
    ("GET", re.compile(r"/openapi\.json")),
)
_QUERY_STRING = re.compile(r"[A-Za-z0-9._~%&=+:-]*")
_FORWARDED_CONTENT_TYPES = re.compile(r"(application/json|image/[a-z0-9.+-]+)(;.*)?", re.IGNORECASE)
_STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Thumbnails and full images are presigned URLs on the bucket's host (any http(s) origin); everything else is ours.
_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src http: https: blob:; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)

logger = logging.getLogger(__name__)


class UiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, client: ClipsearchClient, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> None:
        self.client = client
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def _forwarded_route(method: str, path: str) -> bool:
    if any(segment in (".", "..") for segment in path.split("/")):
        return False
    return any(method == allowed and pattern.fullmatch(path) for allowed, pattern in _FORWARDED_ROUTES)


class _Handler(BaseHTTPRequestHandler):
    server: UiServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_PUT(self) -> None:
        self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", "the page only reads and searches")

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        logger.info("%s %s", self.address_string(), format % args)

    def _answer(self, method: str) -> None:
        if not self._from_this_page():
            return
        parts = urlsplit(self.path)
        if parts.path == API_PREFIX or parts.path.startswith(API_PREFIX + "/"):
            self._forward(method, parts.path[len(API_PREFIX):], parts.query)
        elif method == "GET" and parts.path in _STATIC_FILES:
            self._static(*_STATIC_FILES[parts.path])
        elif method == "GET" and parts.path == "/favicon.ico":  # browsers ask for it; the page has none
            self._send(HTTPStatus.NO_CONTENT, "image/x-icon", b"")
        else:
            self._refuse(HTTPStatus.NOT_FOUND, "not_found", f"no page at {parts.path}")

    def _from_this_page(self) -> bool:
        """Host and Origin must name this server: refuses DNS rebinding and requests sent by other sites' pages."""
        port = self.server.server_address[1]
        own_hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
        if self.headers.get("host") not in own_hosts:
            self._refuse(HTTPStatus.FORBIDDEN, "forbidden_host", "open the page at " + self.server.url)
            return False
        origin = self.headers.get("origin")
        if origin is not None and origin not in {f"http://{host}" for host in own_hosts}:
            self._refuse(HTTPStatus.FORBIDDEN, "forbidden_origin", "requests from other sites are refused")
            return False
        return True

    def _forward(self, method: str, api_path: str, query: str) -> None:
        if not _forwarded_route(method, api_path) or not _QUERY_STRING.fullmatch(query):
            self._refuse(HTTPStatus.NOT_FOUND, "not_forwarded", f"{method} {api_path} is not a route the page uses")
            return
        body, content_type = None, None
        if method == "POST":
            content_type = self.headers.get("content-type", "")
            if not _FORWARDED_CONTENT_TYPES.fullmatch(content_type):
                self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type",
                             "send application/json or image/*")
                return
            body = self._body()
            if body is None:
                return
        try:
            answer = self.server.client.send(method, api_path + (f"?{query}" if query else ""), body, content_type)
        except StackUnreachable as error:
            self._refuse(HTTPStatus.BAD_GATEWAY, "api_unreachable", str(error))
            return
        self._send(answer.status, answer.content_type or "application/json", answer.body)

    def _body(self) -> bytes | None:
        length = self.headers.get("content-length")
        if self.headers.get("transfer-encoding") or length is None or not length.isdigit():
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "length_required", "send the body with a Content-Length")
            return None
        if int(length) > MAX_BODY_BYTES:
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body_too_large",
                         f"the request body is {int(length):,} bytes; the API accepts at most {MAX_BODY_BYTES:,}")
            return None
        return self.rfile.read(int(length))

    def _static(self, name: str, content_type: str) -> None:
        self._send(HTTPStatus.OK, content_type, (resources.files(__package__) / "static" / name).read_bytes())

    def _refuse(self, status: HTTPStatus, code: str, message: str) -> None:
        self.close_connection = True  # an unread request body must not be taken for the next request
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        self._send(status, "application/json", body)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "no-store")
        self.send_header("x-content-type-options", "nosniff")
        self.send_header("referrer-policy", "no-referrer")
        self.send_header("content-security-policy", _CONTENT_SECURITY_POLICY)
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)
