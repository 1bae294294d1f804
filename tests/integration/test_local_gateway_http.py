"""The local gateway over raw sockets: hostile framing answered with a JSON 4xx, bursts of clients never reset."""

from __future__ import annotations

import json
import select
import socket
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from clipsearch_tools.local.functions import FunctionHost
from clipsearch_tools.local.gateway import LocalGateway
from clipsearch_tools.local.template import load_template

pytestmark = pytest.mark.integration

FUNCTION = '''
import json
import os
import time


def handler(event, context):
    if event["rawPath"].startswith("/slow"):
        time.sleep(0.05)
    return {"statusCode": 200, "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"body": event.get("body"), "base64": event["isBase64Encoded"], "pid": os.getpid()})}
'''

TEMPLATE = """
Resources:
  Queue: {Type: AWS::SQS::Queue}
  Worker:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/echo/
      Handler: app.handler
      Events: {Work: {Type: SQS, Properties: {Queue: !GetAtt Queue.Arn}}}
  Echo:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/echo/
      Handler: app.handler
      Events:
        Item: {Type: HttpApi, Properties: {Path: /echo, Method: POST}}
        Slow: {Type: HttpApi, Properties: {Path: /slow, Method: GET}}
"""

READ_TIMEOUT = 1.0
INSTANCES = 2


def _start_gateway(tmp_path: Path, **options) -> tuple[LocalGateway, FunctionHost]:
    (tmp_path / "functions" / "echo").mkdir(parents=True, exist_ok=True)
    (tmp_path / "functions" / "echo" / "app.py").write_text(textwrap.dedent(FUNCTION))
    (tmp_path / "template.yaml").write_text(TEMPLATE)
    routes = load_template(tmp_path / "template.yaml").routes
    host = FunctionHost(runtime_dir=tmp_path / "runtime", concurrency={"Echo": INSTANCES})
    gateway = LocalGateway(routes, host.invoke, concurrency={"Echo": INSTANCES}, **options)
    gateway.start()
    return gateway, host


@pytest.fixture
def gateway(tmp_path: Path):
    gateway, host = _start_gateway(tmp_path, read_timeout_seconds=READ_TIMEOUT)
    yield gateway
    gateway.stop()
    host.stop()


class Answer:
    """One HTTP response read off a raw socket, and whether the server closed the connection after it."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, closed: bool) -> None:
        self.status, self.headers, self.body, self.closed = status, headers, body, closed

    def json(self) -> dict:
        assert self.headers.get("content-type") == "application/json"
        return json.loads(self.body)


def _connect(gateway: LocalGateway, timeout: float = 5) -> socket.socket:
    address = urlsplit(gateway.url)
    return socket.create_connection((address.hostname, address.port), timeout=timeout)


def _read_answer(sock: socket.socket, buffer: bytearray) -> Answer:
    """Reads one response; a socket timeout (a hang) or a reset fails the caller's test."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer (got {bytes(buffer)!r})"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in the middle of its answer"
        rest += chunk
    buffer[:] = rest[length:]
    return Answer(int(status_line.split()[1]), headers, rest[:length], closed=False)


def _closed_after(sock: socket.socket, buffer: bytearray) -> bool:
    if buffer:
        return False
    sock.settimeout(3)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def exchange(gateway: LocalGateway, raw: bytes, half_close: bool = False) -> Answer:
    with _connect(gateway) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        buffer = bytearray()
        answer = _read_answer(sock, buffer)
        answer.closed = _closed_after(sock, buffer)
        return answer


def _post(body: bytes, *extra_headers: str) -> bytes:
    head = ["POST /echo HTTP/1.1", "Host: localhost", "Content-Type: application/json", *extra_headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


FRAMING_ERRORS = {
    "length not a number": (_post(b"{}", "Content-Length: abc"), 400),
    "negative length": (_post(b"{}", "Content-Length: -1"), 400),
    "two different lengths": (_post(b'{"a":1}', "Content-Length: 2", "Content-Length: 7"), 400),
    "length and chunked together": (_post(b"0\r\n\r\n", "Content-Length: 5", "Transfer-Encoding: chunked"), 400),
    "unsupported transfer coding": (_post(b"{}", "Transfer-Encoding: gzip"), 501),
    "garbage request line": (b"\x16\x03\x01\x02\x00\x01\x00 hello\r\n\r\n", 400),
    "no HTTP version": (b"GET /echo\r\n\r\n", 400),
    "header without a name": (b"GET /slow HTTP/1.1\r\nHost: x\r\n: v\r\n\r\n", 400),
    "headers over the limit": (b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431),
    "body over the limit": (_post(b"", f"Content-Length: {11 * 1024 * 1024}"), 413),
    "chunked body over the limit": (
        _post(b"", "Transfer-Encoding: chunked") + (b"100000\r\n" + b"a" * 0x100000 + b"\r\n") * 11, 413),
}


@pytest.mark.parametrize("raw, status", FRAMING_ERRORS.values(), ids=FRAMING_ERRORS.keys())
def test_framing_errors_answer_a_json_error_with_a_code_and_close_the_connection(gateway, raw, status):
    answer = exchange(gateway, raw)
    assert answer.status == status
    error = answer.json()
    assert error["message"] and error["code"]
    assert answer.headers.get("connection") == "close" and answer.closed


@pytest.mark.parametrize("half_close", [False, True], ids=["client waits", "client closed its side"])
def test_a_body_shorter_than_its_length_is_answered_not_awaited(gateway, half_close):
    started = time.monotonic()
    answer = exchange(gateway, _post(b'{"a"', "Content-Length: 100"), half_close=half_close)
    assert answer.status == (400 if half_close else 408) and answer.json()["code"]
    assert answer.closed and time.monotonic() - started < READ_TIMEOUT + 2


def test_headers_trickling_in_slower_than_the_read_timeout_are_answered_408(gateway):
    with _connect(gateway) as sock:
        started = time.monotonic()
        for byte in b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n" * 10:
            if select.select([sock], [], [], 0.1)[0]:
                break  # the server answered: stop sending
            sock.sendall(bytes([byte]))
        buffer = bytearray()
        answer = _read_answer(sock, buffer)
        assert answer.status == 408 and answer.json()["code"] == "request_timeout"
        assert time.monotonic() - started < READ_TIMEOUT + 5


def test_well_framed_requests_share_a_connection_chunked_and_pipelined(gateway):
    chunked = _post(b"4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n", "Transfer-Encoding: chunked")
    plain = _post(b'{"b":2}', "Content-Length: 7")
    repeated_length = _post(b'{"c":3}', "Content-Length: 7", "Content-Length: 7")
    with _connect(gateway) as sock:
        sock.sendall(chunked + plain + repeated_length)  # pipelined: all three before any answer
        buffer = bytearray()
        answers = [_read_answer(sock, buffer) for _ in range(3)]
        sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        missing = _read_answer(sock, buffer)
        assert _closed_after(sock, buffer)
    assert [answer.status for answer in answers] == [200, 200, 200]
    assert [answer.json()["body"] for answer in answers] == ['{"a":1}', '{"b":2}', '{"c":3}']
    assert missing.status == 404 and missing.json()["code"] == "not_found"


def test_the_gateway_still_answers_after_every_framing_error(gateway):
    for raw, _ in FRAMING_ERRORS.values():
        with _connect(gateway) as sock:
            sock.sendall(raw[:200])  # and leave without reading
    answer = exchange(gateway, _post(b"{}", "Content-Length: 2", "Connection: close"))
    assert answer.status == 200 and answer.closed


def _burst(gateway: LocalGateway, clients: int, requests_each: int) -> tuple[list[Answer], list[BaseException], float]:
    """`clients` threads connect at the same instant, each sending its requests one by one on one connection.

    Returns the answers, the connection errors and the longest time a client waited for its connection.
    """
    answers: list[Answer] = []
    errors: list[BaseException] = []
    connect_seconds: list[float] = []
    start = threading.Barrier(clients)
    lock = threading.Lock()

    def client() -> None:
        start.wait()
        started = time.monotonic()
        try:
            with _connect(gateway, timeout=60) as sock:
                with lock:
                    connect_seconds.append(time.monotonic() - started)
                buffer = bytearray()
                for _ in range(requests_each):
                    sock.sendall(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    answer = _read_answer(sock, buffer)
                    with lock:
                        answers.append(answer)
        except (OSError, AssertionError) as error:
            with lock:
                errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers, errors, max(connect_seconds, default=0.0)


def test_a_burst_of_clients_is_served_concurrently_and_never_reset(gateway):
    answers, errors, slowest_connect = _burst(gateway, clients=60, requests_each=3)
    assert errors == []
    assert slowest_connect < 1.0  # accepted at once: a full listen backlog drops SYNs, retried after 1 s, 3 s, ...
    assert len(answers) == 180
    assert {answer.status for answer in answers} <= {200, 429, 503}
    served = [answer for answer in answers if answer.status == 200]
    assert len(served) == 180  # the default queue holds every one of 60 clients
    assert len({answer.json()["pid"] for answer in served}) == INSTANCES  # the function's instances ran in parallel


def test_overload_is_answered_429_or_503_with_retry_after_never_a_reset(tmp_path: Path):
    gateway, host = _start_gateway(tmp_path, queue_limit=4, queue_wait_seconds=0.5)
    try:
        answers, errors, _ = _burst(gateway, clients=50, requests_each=2)
    finally:
        gateway.stop()
        host.stop()
    assert errors == []
    assert len(answers) == 100
    statuses = {answer.status for answer in answers}
    assert statuses <= {200, 429, 503} and 200 in statuses and statuses & {429, 503}
    for answer in answers:
        if answer.status != 200:
            assert int(answer.headers["retry-after"]) >= 1
            assert answer.json()["code"] in ("too_many_requests", "service_unavailable")
