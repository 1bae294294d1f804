"""The local stack's SQS: moto's server, without moto's costs that grow with the queue's length or repeat per request.

moto 5.2.5 (not AWS) asks a datetime-based clock for the time of every message it scans, and on every
ReceiveMessage it reads a message's retention period by computing all the queue's attributes (three of them
counts over the whole queue), once per message returned. With an upload of 1,000 images queued ahead of the
preprocessing function, the stand-in then took 49 of the 158 CPU-seconds of a 79 s ingest on 2 cores
(benchmarks/ingest.py), CPU the function needed. SendMessage, too, reads one attribute
(ContentBasedDeduplication) by computing them all, counts over the queue included: with 600 messages queued that
was 15% of the stand-in's CPU in a send/receive/delete cycle. Here the clock is `time.time()` (the same instant, without
datetime arithmetic), the retention check reads the retention period alone, and while a message is sent the
queue's attributes are that one attribute, computed as moto computes it: what moto answers is unchanged.
Its server also lists moto's package directory (os.listdir and a stat per entry, ~150) on every request to
route it; the listing cannot change while the server runs, so it is read once. And werkzeug's server closes the
connection after every answer, so each SQS call paid a TCP connect, a new server thread and a close; here a
connection stays open between requests (HTTP/1.1 keep-alive, as SQS's own endpoint keeps it).
Other moto versions are left as they are.
"""

from __future__ import annotations

import io
import logging
import threading
import time

import moto
import moto.backends
import moto.sqs.models
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.sqs.models import Message, Queue, SQSBackend
from werkzeug.serving import make_server

logger = logging.getLogger(__name__)

PATCHED_MOTO_VERSION = "5.2.5"


def _unix_time_millis() -> float:
    return time.time() * 1000.0


def _within_retention_period(backend: SQSBackend, queue_name: str, message: Message) -> bool:
    retention_seconds = int(backend.get_queue(queue_name).message_retention_period)
    return message.sent_timestamp / 1000 + retention_seconds > time.time()


_sending = threading.local()
_all_attributes = Queue.attributes


def _send_message(backend: SQSBackend, *args, **kwargs) -> Message:
    _sending.active = True
    try:
        return _original_send_message(backend, *args, **kwargs)
    finally:
        _sending.active = False


def _attributes(queue: Queue) -> dict:
    """While a message is sent, moto reads only ContentBasedDeduplication (a FIFO queue's) from this."""
    if not getattr(_sending, "active", False):
        return _all_attributes.fget(queue)
    if not queue.fifo_queue:
        return {}
    value = queue.content_based_deduplication
    return {"ContentBasedDeduplication": str(value).lower() if isinstance(value, bool) else value}


_original_send_message = SQSBackend.send_message


def _lighten_moto_sqs() -> None:
    if moto.__version__ != PATCHED_MOTO_VERSION:
        logger.warning("moto %s, not %s: its SQS costs grow with the queue's length here",
                       moto.__version__, PATCHED_MOTO_VERSION)
        return
    moto.sqs.models.unix_time_millis = _unix_time_millis  # what Message.visible and .delayed call per message
    moto_modules = tuple(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = lambda: moto_modules
    SQSBackend.is_message_valid_based_on_retention_period = _within_retention_period
    SQSBackend.send_message = _send_message
    Queue.attributes = property(_attributes)


class _KeepAliveRequestHandler(MotoRequestHandler):
    """Leaves the connection open after an answer when the request's body was read whole (a Content-Length
    body, read here before moto sees it): the next request line then starts right where this one ended."""

    _reusable = False
    disable_nagle_algorithm = True  # an open connection's small writes would otherwise wait for delayed ACKs

    def make_environ(self) -> dict:
        environ = super().make_environ()
        self._reusable = False
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            return environ
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return environ
        environ["wsgi.input"] = io.BytesIO(self.rfile.read(length) if length > 0 else b"")
        self._reusable = True
        # werkzeug drains "what is left" of the request after answering, which on an open connection would be
        # the next request: it drains an empty stream instead (handle_one_request puts the socket's back).
        self.rfile = io.BytesIO()
        return environ

    def handle_one_request(self) -> None:
        connection_stream = self.rfile
        try:
            super().handle_one_request()
        finally:
            self.rfile = connection_stream

    def send_header(self, keyword: str, value: str) -> None:
        if self._reusable and keyword.lower() == "connection" and value.lower() == "close":
            return  # werkzeug sends it after every answer; the client's own Connection header decides
        super().send_header(keyword, value)


class _KeepAliveMotoServer(ThreadedMotoServer):
    def _server_entry(self) -> None:
        self._server = make_server(self._ip_address, self._port, DomainDispatcherApplication(create_backend_app),
                                   True, request_handler=_KeepAliveRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


def start_sqs_server() -> ThreadedMotoServer:
    """moto's SQS on 127.0.0.1, on a port the kernel gives it as it binds (`get_host_and_port` tells which)."""
    _lighten_moto_sqs()
    server = _KeepAliveMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server
