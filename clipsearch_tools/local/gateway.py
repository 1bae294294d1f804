"""The local HTTP API: serves the template's HttpApi routes by invoking their functions with v2 events."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

from clipsearch_tools.local.template import Function, Route

logger = logging.getLogger(__name__)

API_ID = "local"
_TEXT_TYPES = ("application/json", "application/xml", "application/javascript", "application/x-www-form-urlencoded")


def http_api_event(
    route: Route, method: str, raw_path: str, raw_query: str, headers: dict[str, str], body: bytes,
    path_parameters: dict[str, str], source_ip: str,
) -> dict:
    """An API Gateway HTTP API payload-format-2.0 event, as the function receives it."""
    lowered = {name.lower(): value for name, value in headers.items()}
    query: dict[str, str] = {}
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        query[name] = f"{query[name]},{value}" if name in query else value  # API Gateway joins repeats
    text_body = _is_text(lowered.get("content-type", ""))
    if body and text_body:
        try:
            encoded_body, is_base64 = body.decode("utf-8"), False
        except UnicodeDecodeError:
            encoded_body, is_base64 = base64.b64encode(body).decode("ascii"), True
    elif body:
        encoded_body, is_base64 = base64.b64encode(body).decode("ascii"), True
    else:
        encoded_body, is_base64 = None, False
    now = datetime.now(UTC)
    event = {
        "version": "2.0",
        "routeKey": route.route_key,
        "rawPath": raw_path,
        "rawQueryString": raw_query,
        "headers": lowered,
        "requestContext": {
            "accountId": "000000000000",
            "apiId": API_ID,
            "domainName": lowered.get("host", "localhost"),
            "domainPrefix": API_ID,
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": lowered.get("user-agent", ""),
            },
            "requestId": uuid.uuid4().hex,
            "routeKey": route.route_key,
            "stage": "$default",
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now.timestamp() * 1000),
        },
        "isBase64Encoded": is_base64,
    }
    if query:
        event["queryStringParameters"] = query
    if path_parameters:
        event["pathParameters"] = {name: unquote(value) for name, value in path_parameters.items()}
    if encoded_body is not None:
        event["body"] = encoded_body
    return event


def http_response(result) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body from a function's payload-format-2.0 response."""
    if not isinstance(result, dict) or "statusCode" not in result:
        # Format 2.0: anything without a statusCode is a 200 JSON body.
        return 200, {"content-type": "application/json"}, json.dumps(result).encode()
    body = result.get("body") or ""
    data = base64.b64decode(body) if result.get("isBase64Encoded") else str(body).encode("utf-8")
    headers = {name.lower(): str(value) for name, value in (result.get("headers") or {}).items()}
    for name, values in (result.get("multiValueHeaders") or {}).items():
        headers[name.lower()] = ",".join(str(value) for value in values)
    return int(result["statusCode"]), headers, data


class LocalGateway:
    """A threaded HTTP server on 127.0.0.1 routing each request to its function."""

    def __init__(self, routes: Sequence[Route], invoke: Callable[[Function, dict], object], port: int = 0) -> None:
        self._routes = routes
        self._invoke = invoke
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._request_handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes, source_ip: str):
        split = urlsplit(target)
        for route in self._routes:
            parameters = route.match(method, split.path)
            if parameters is not None:
                event = http_api_event(route, method, split.path, split.query, headers, body, parameters, source_ip)
                try:
                    return http_response(self._invoke(route.function, event))
                except Exception:
                    logger.exception("%s failed on %s %s", route.function.logical_id, method, split.path)
                    return _error(HTTPStatus.BAD_GATEWAY, "the function failed: see the stack log")
        return _error(HTTPStatus.NOT_FOUND, f"no route {method} {split.path}")

    def _request_handler(self) -> type[BaseHTTPRequestHandler]:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                started = time.perf_counter()
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, data = gateway.handle(
                    self.command, self.path, dict(self.headers.items()), body, self.client_address[0]
                )
                self.send_response(status)
                for name, value in headers.items():
                    if name not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                logger.info("%s %s -> %d in %.0f ms", self.command, self.path, status,
                            (time.perf_counter() - started) * 1000)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve

            def log_message(self, format: str, *args) -> None:  # the request is logged once, above
                return

        return Handler


def _is_text(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media.startswith("text/") or media in _TEXT_TYPES or media.endswith(("+json", "+xml"))


def _error(status: HTTPStatus, message: str) -> tuple[int, dict[str, str], bytes]:
    # API Gateway's own errors carry {"message": ...}; the functions' errors carry {"error": {...}}.
    return status.value, {"content-type": "application/json"}, json.dumps({"message": message}).encode()
