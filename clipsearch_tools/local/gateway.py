"""The local HTTP API: serves the template's HttpApi routes by invoking their functions with v2 events.

It stands where API Gateway stands, so it refuses what API Gateway refuses, the way a proxy does: the
request framing is parsed by h11 (a strict HTTP/1.1 parser), and a malformed or oversized request, a
body that stops arriving, or more requests than a function's instances and queue can take are answered
with a JSON error carrying a `code` (400, 408, 413, 429, 431, 501, 503), never a dropped connection.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

from clipsearch_tools.local.template import Function, Route

logger = logging.getLogger(__name__)

API_ID = "local"
MAX_HEADER_BYTES = 10 * 1024  # API Gateway HTTP API: request line and headers together
MAX_BODY_BYTES = 10 * 1024 * 1024  # API Gateway HTTP API's payload quota (Lambda's 6 MB is not enforced locally)
READ_TIMEOUT_SECONDS = 10.0  # from a request's first byte to its last: slow or short requests are answered 408
IDLE_TIMEOUT_SECONDS = 30.0  # a kept-alive connection without a request is closed, as API Gateway's idle timeout
LISTEN_BACKLOG = 1024  # a burst of connections waits here; socketserver's 5 dropped SYNs and reset clients
MAX_CONNECTIONS = 1000  # open at once (one thread each); more are answered 503
QUEUE_LIMIT = 100  # requests waiting for a busy function's instance; more are answered 429
QUEUE_WAIT_SECONDS = 25.0  # under API Gateway's 30 s integration timeout; a longer wait is answered 503
RETRY_AFTER_SECONDS = 1
_LINGER_SECONDS = 2.0  # after an error answer: read what the client still sends, so closing does not reset
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


class GatewayRefusal(Exception):
    """A request the gateway answers itself, as API Gateway would, without invoking a function."""

    def __init__(self, status: HTTPStatus, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = _error(self.status, self.message, self.code)
        if self.retry_after is not None:
            headers["retry-after"] = str(self.retry_after)
        return status, headers, body


class FunctionThrottle:
    """Lets `instances` requests invoke a function at once and queues up to `queue_limit` more, first come first served.

    Lambda would run one instance per concurrent request up to the function's concurrency, and API
    Gateway throttles above its limits with 429: here a full queue answers 429 and a request that waited
    `wait_seconds` for an instance answers 503, both with Retry-After. A freed instance goes to the
    oldest waiting request, never to one that just arrived, so that no request waits behind newcomers.
    """

    def __init__(self, instances: int, queue_limit: int, wait_seconds: float) -> None:
        self.instances = max(1, instances)
        self._queue_limit = queue_limit
        self._wait_seconds = wait_seconds
        self._running = 0
        self._queue: deque[threading.Event] = deque()
        self._lock = threading.Lock()

    @contextmanager
    def admitted(self) -> Iterator[None]:
        with self._lock:
            if self._running < self.instances and not self._queue:
                self._running += 1
                turn = None
            elif len(self._queue) >= self._queue_limit:
                raise GatewayRefusal(HTTPStatus.TOO_MANY_REQUESTS, "too_many_requests", "Too Many Requests",
                                     RETRY_AFTER_SECONDS)
            else:
                turn = threading.Event()
                self._queue.append(turn)
        if turn is not None and not turn.wait(self._wait_seconds):
            with self._lock:
                if not turn.is_set():  # else an instance was handed over just now: take it
                    self._queue.remove(turn)
                    raise GatewayRefusal(HTTPStatus.SERVICE_UNAVAILABLE, "service_unavailable",
                                         "Service Unavailable: every instance stayed busy", RETRY_AFTER_SECONDS)
        try:
            yield
        finally:
            with self._lock:
                if self._queue:
                    self._queue.popleft().set()  # the slot passes on: _running is unchanged
                else:
                    self._running -= 1


class LocalGateway:
    """An HTTP/1.1 server on 127.0.0.1 routing each request to its function, one thread per connection.

    `concurrency` gives each function's instances (by logical id; 1 when absent): the FunctionHost
    must allow as many, so that admitted requests run in parallel rather than wait inside the host.
    """

    def __init__(self, routes: Sequence[Route], invoke: Callable[[Function, dict], object], port: int = 0,
                 concurrency: Mapping[str, int] | None = None, queue_limit: int = QUEUE_LIMIT,
                 queue_wait_seconds: float = QUEUE_WAIT_SECONDS,
                 read_timeout_seconds: float = READ_TIMEOUT_SECONDS) -> None:
        self._routes = routes
        self._invoke = invoke
        self.read_timeout_seconds = read_timeout_seconds
        concurrency = concurrency or {}
        self._throttles = {
            route.function.logical_id: FunctionThrottle(concurrency.get(route.function.logical_id, 1), queue_limit,
                                                        queue_wait_seconds)
            for route in routes
        }
        self._listener = socket.create_server(("127.0.0.1", port), backlog=LISTEN_BACKLOG)
        self._listener.settimeout(0.5)  # the accept loop looks at `_stopping` this often
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)
        self._listener.close()
        with self._connections_lock:
            open_connections = list(self._connections)
        for connection in open_connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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
                    with self._throttles[route.function.logical_id].admitted():
                        return http_response(self._invoke(route.function, event))
                except GatewayRefusal as refusal:
                    logger.warning("%s %s: %s", method, split.path, refusal.message)
                    return refusal.answer()
                except Exception:
                    logger.exception("%s failed on %s %s", route.function.logical_id, method, split.path)
                    return _error(HTTPStatus.BAD_GATEWAY, "the function failed: see the stack log", "bad_gateway")
        return _error(HTTPStatus.NOT_FOUND, f"no route {method} {split.path}", "not_found")

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                logger.exception("the gateway could not accept a connection")
                time.sleep(0.1)
                continue
            with self._connections_lock:
                over_limit = len(self._connections) >= MAX_CONNECTIONS
                self._connections.add(connection)
            threading.Thread(target=self._serve_connection, args=(connection, address[0], over_limit),
                             name="gateway-connection", daemon=True).start()

    def _serve_connection(self, connection: socket.socket, source_ip: str, over_limit: bool) -> None:
        try:
            if over_limit:
                _send_refusal(connection, GatewayRefusal(
                    HTTPStatus.SERVICE_UNAVAILABLE, "service_unavailable",
                    f"Service Unavailable: over {MAX_CONNECTIONS} open connections", RETRY_AFTER_SECONDS))
            else:
                _HttpConnection(self, connection, source_ip).serve()
        except OSError:
            pass  # the client went away
        except Exception:
            logger.exception("the gateway failed on a connection from %s", source_ip)
        finally:
            with self._connections_lock:
                self._connections.discard(connection)
            connection.close()


class _HttpConnection:
    """One client connection: requests parsed by h11 in turn (kept alive, pipelined), each answered."""

    def __init__(self, gateway: LocalGateway, connection: socket.socket, source_ip: str) -> None:
        self._gateway = gateway
        self._socket = connection
        self._source_ip = source_ip
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._deadline: float | None = None  # the current request's, from its first byte; None while idle

    def serve(self) -> None:
        while True:
            try:
                request = self._read_request()
                if request is None:
                    return
                started = time.perf_counter()
                body = self._read_body(request)
            except GatewayRefusal as refusal:
                logger.info("refused a request from %s: %d %s", self._source_ip, refusal.status.value, refusal.message)
                _send_refusal(self._socket, refusal)
                return
            method, target = request.method.decode("ascii"), request.target.decode("latin-1")
            headers: dict[str, str] = {}
            for raw_name, raw_value in request.headers:  # h11 gives names in lower case
                name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
                headers[name] = f"{headers[name]},{value}" if name in headers else value  # API Gateway joins repeats
            status, answer_headers, data = self._gateway.handle(method, target, headers, body, self._source_ip)
            self._respond(method, status, answer_headers, data)
            logger.info("%s %s -> %d in %.0f ms", method, target, status, (time.perf_counter() - started) * 1000)
            if self._http.our_state is not h11.DONE or self._http.their_state is not h11.DONE:
                return  # either side asked to close (Connection: close, HTTP/1.0)
            self._http.start_next_cycle()
            self._deadline = None

    def _read_request(self) -> h11.Request | None:
        """The next request's head; None when the client closed or stayed idle between requests."""
        event = self._next_event()
        if not isinstance(event, h11.Request):
            return None
        head_bytes = len(event.method) + len(event.target) + sum(len(name) + len(value) + 4 for name, value in event.headers)
        if head_bytes > MAX_HEADER_BYTES:
            raise _headers_too_large()
        names = [name for name, _ in event.headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            raise GatewayRefusal(HTTPStatus.BAD_REQUEST, "ambiguous_framing",
                                 "a request may not carry both Transfer-Encoding and Content-Length")
        declared = next((int(value) for name, value in event.headers if name == b"content-length"), 0)
        if declared > MAX_BODY_BYTES:
            raise GatewayRefusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "payload_too_large",
                                 f"the body exceeds {MAX_BODY_BYTES} bytes")
        return event

    def _read_body(self, request: h11.Request) -> bytes:
        if self._http.they_are_waiting_for_100_continue:
            self._socket.sendall(self._http.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise GatewayRefusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "payload_too_large",
                                         f"the body exceeds {MAX_BODY_BYTES} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)

    def _next_event(self):
        """h11's next event, reading as needed; None when the connection stayed idle too long between requests."""
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as error:
                raise _framing_refusal(error) from None
            if event is not h11.NEED_DATA:
                return event
            if self._deadline is None and self._http.trailing_data[0]:
                self._deadline = time.monotonic() + self._gateway.read_timeout_seconds  # a pipelined request began
            timeout = IDLE_TIMEOUT_SECONDS if self._deadline is None else self._deadline - time.monotonic()
            if timeout <= 0:
                raise GatewayRefusal(HTTPStatus.REQUEST_TIMEOUT, "request_timeout",
                                     f"the request did not arrive within {self._gateway.read_timeout_seconds:g} s")
            self._socket.settimeout(timeout)
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                if self._deadline is None:
                    return None
                continue
            if data and self._deadline is None:
                self._deadline = time.monotonic() + self._gateway.read_timeout_seconds
            self._http.receive_data(data)

    def _respond(self, method: str, status: int, headers: dict[str, str], data: bytes) -> None:
        response_headers = [(name, value) for name, value in headers.items()
                            if name not in ("content-length", "connection", "transfer-encoding")]
        response_headers.append(("content-length", str(len(data))))
        self._socket.settimeout(self._gateway.read_timeout_seconds)
        out = self._http.send(h11.Response(status_code=status, headers=response_headers))
        if method != "HEAD" and data:
            out += self._http.send(h11.Data(data=data))
        out += self._http.send(h11.EndOfMessage())
        self._socket.sendall(out)


def _headers_too_large() -> GatewayRefusal:
    return GatewayRefusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large",
                          f"the request line and headers exceed {MAX_HEADER_BYTES} bytes")


def _framing_refusal(error: h11.RemoteProtocolError) -> GatewayRefusal:
    status = HTTPStatus(error.error_status_hint)
    if status is HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
        return _headers_too_large()
    code = "not_implemented" if status is HTTPStatus.NOT_IMPLEMENTED else "malformed_request"
    return GatewayRefusal(status, code, f"malformed request: {error}")


def _send_refusal(connection: socket.socket, refusal: GatewayRefusal) -> None:
    """Answers `refusal` and closes the connection the way a proxy does after a framing error."""
    status, headers, body = refusal.answer()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{name}: {value}" for name, value in headers.items()),
            f"content-length: {len(body)}", "connection: close"]
    connection.settimeout(_LINGER_SECONDS)
    connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
    # Closing with unread bytes in the receive buffer sends a reset that can overtake the answer: read
    # what the client is still sending (a body we refused) for a moment first.
    connection.shutdown(socket.SHUT_WR)
    linger_until = time.monotonic() + _LINGER_SECONDS
    try:
        while time.monotonic() < linger_until and connection.recv(65536):
            pass
    except OSError:
        pass


def _is_text(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media.startswith("text/") or media in _TEXT_TYPES or media.endswith(("+json", "+xml"))


def _error(status: HTTPStatus, message: str, code: str) -> tuple[int, dict[str, str], bytes]:
    # API Gateway's own errors carry {"message": ...}; the functions' errors carry {"error": {...}}.
    return status.value, {"content-type": "application/json"}, json.dumps({"message": message, "code": code}).encode()
