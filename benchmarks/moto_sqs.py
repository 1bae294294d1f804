"""moto's server for the benchmark's queue, without moto costs that grow with the queue's length.

moto 5.2.5 (not AWS) rescans the whole queue on each SendMessage, and on ReceiveMessage once per message
it returns (to read the retention period it computes every queue attribute, three of them counts over
the queue), asking a datetime-based clock for the time of every message scanned: with 1,500 messages
queued a send took ~17 ms and a receive of 10 ~0.4 s of CPU, on the cores the benchmark measures. Here
the clock is `time.time()` (the same instant, without datetime arithmetic) and the retention check
reads the retention period alone; what moto returns is unchanged.

    python benchmarks/moto_sqs.py -H 127.0.0.1 -p PORT       # the arguments of `python -m moto.server`
"""

from __future__ import annotations

import time

import moto.sqs.models
from moto.server import main
from moto.sqs.models import Message, SQSBackend


def _unix_time_millis() -> float:
    return time.time() * 1000.0


def _within_retention_period(backend: SQSBackend, queue_name: str, message: Message) -> bool:
    retention_seconds = int(backend.get_queue(queue_name).message_retention_period)
    return message.sent_timestamp / 1000 + retention_seconds > time.time()


moto.sqs.models.unix_time_millis = _unix_time_millis  # what Message.visible and .delayed call per message scanned
SQSBackend.is_message_valid_based_on_retention_period = _within_retention_period

if __name__ == "__main__":
    main()
