"""The queue's event source mapping: long-polls SQS and invokes the preprocessing function with batches.

Like Lambda's SQS poller: the function gets real SQS event records; messages the function names in
batchItemFailures (or all of them, when the invocation fails: an exception, a timeout, an instance
killed for memory) stay on the queue to reappear after the visibility timeout, and the queue's
redrive policy moves them to the dead-letter queue. Up to `concurrency` batches run at once, each on
its own instance of the function, as Lambda scales an SQS source up to ScalingConfig.MaximumConcurrency.

How batches close differs from AWS on purpose. AWS closes a batch when it holds BatchSize messages,
when MaximumBatchingWindowInSeconds has passed since its first message, or at 6 MB of payload, so
the last partial batch of a finite upload waits out the whole window. Here a batch also closes as
soon as a receive comes back empty after its long poll (`_POLL_SECONDS`): the queue is drained, and
waiting the rest of the window would only delay the images already received. While messages keep
arriving, batches fill up to the batch size within the window as in AWS.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

_POLL_SECONDS = 1  # long-poll wait: short enough to notice a stop request promptly
_RECEIVE_MAX = 10  # SQS's ReceiveMessage limit


class QueueRunner:
    def __init__(
        self,
        sqs_client,
        queue_url: str,
        queue_arn: str,
        invoke: Callable[[dict], dict | None],
        batch_size: int,
        batching_window_seconds: float,
        concurrency: int = 1,
    ) -> None:
        self._sqs = sqs_client
        self._queue_url = queue_url
        self._queue_arn = queue_arn
        self._invoke = invoke
        self._batch_size = batch_size
        self._window = batching_window_seconds
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"queue-runner-{number}", daemon=True)
            for number in range(1, max(1, concurrency) + 1)
        ]
        self._counts = threading.Lock()
        self._in_progress = 0
        self.batches = 0  # batches the function answered (with or without failed items)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 300) -> None:
        """Stops after the batches in progress, if any."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    @property
    def busy(self) -> bool:
        return self._in_progress > 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                messages = self._collect_batch()
                if messages:
                    self._process(messages)
            except Exception:  # the poller survives anything one batch does, as Lambda's does
                logger.exception("queue runner: batch failed")
                self._stop.wait(1)

    def _collect_batch(self) -> list[dict]:
        messages = self._receive(min(_RECEIVE_MAX, self._batch_size), _POLL_SECONDS)
        if not messages:
            return []
        closes = time.monotonic() + self._window
        while len(messages) < self._batch_size and not self._stop.is_set() and time.monotonic() < closes:
            wanted = min(_RECEIVE_MAX, self._batch_size - len(messages))
            more = self._receive(wanted, _POLL_SECONDS)
            if not more:  # drained: close now rather than wait out the window (see the module's docstring)
                break
            messages += more
        return messages

    def _receive(self, count: int, wait_seconds: int) -> list[dict]:
        response = self._sqs.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=wait_seconds,
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        return response.get("Messages", [])

    def _process(self, messages: list[dict]) -> None:
        event = {"Records": [self._record(message) for message in messages]}
        with self._counts:
            self._in_progress += 1
        try:
            response = self._invoke(event) or {}
        except Exception as error:
            logger.error("the function failed on %d messages; they will be retried: %s",
                         len(messages), error)
            return
        finally:
            with self._counts:
                self._in_progress -= 1
        with self._counts:
            self.batches += 1
        failed = {item["itemIdentifier"] for item in response.get("batchItemFailures") or []}
        done = [message for message in messages if message["MessageId"] not in failed]
        for start in range(0, len(done), _RECEIVE_MAX):
            self._sqs.delete_message_batch(
                QueueUrl=self._queue_url,
                Entries=[
                    {"Id": str(position), "ReceiptHandle": message["ReceiptHandle"]}
                    for position, message in enumerate(done[start : start + _RECEIVE_MAX])
                ],
            )
        logger.info("queue runner: %d messages processed, %d left for retry", len(done), len(failed))

    def _record(self, message: dict) -> dict:
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": dict(message.get("Attributes") or {}),
            "messageAttributes": {
                name: {
                    "stringValue": value.get("StringValue"),
                    "binaryValue": value.get("BinaryValue"),
                    "stringListValues": [],
                    "binaryListValues": [],
                    "dataType": value.get("DataType"),
                }
                for name, value in (message.get("MessageAttributes") or {}).items()
            },
            "md5OfBody": message.get("MD5OfBody") or hashlib.md5(message["Body"].encode()).hexdigest(),
            "eventSource": "aws:sqs",
            "eventSourceARN": self._queue_arn,
            "awsRegion": "us-east-1",
        }
