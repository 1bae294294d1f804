"""The local stack's SQS: moto's server, without two moto costs that grow with the queue's length.

moto 5.2.5 (not AWS) asks a datetime-based clock for the time of every message it scans, and on every
ReceiveMessage it reads a message's retention period by computing all the queue's attributes (three of them
counts over the whole queue), once per message returned. With an upload of 1,000 images queued ahead of the
preprocessing function, the stand-in then took 49 of the 158 CPU-seconds of a 79 s ingest on 2 cores
(benchmarks/ingest.py), CPU the function needed. Here the clock is `time.time()` (the same instant, without
datetime arithmetic) and the retention check reads the retention period alone: what moto answers is unchanged.
Other moto versions are left as they are.
"""

from __future__ import annotations

import logging
import time

import moto
import moto.sqs.models
from moto.server import ThreadedMotoServer
from moto.sqs.models import Message, SQSBackend

logger = logging.getLogger(__name__)

PATCHED_MOTO_VERSION = "5.2.5"


def _unix_time_millis() -> float:
    return time.time() * 1000.0


def _within_retention_period(backend: SQSBackend, queue_name: str, message: Message) -> bool:
    retention_seconds = int(backend.get_queue(queue_name).message_retention_period)
    return message.sent_timestamp / 1000 + retention_seconds > time.time()


def _lighten_moto_sqs() -> None:
    if moto.__version__ != PATCHED_MOTO_VERSION:
        logger.warning("moto %s, not %s: its SQS costs grow with the queue's length here",
                       moto.__version__, PATCHED_MOTO_VERSION)
        return
    moto.sqs.models.unix_time_millis = _unix_time_millis  # what Message.visible and .delayed call per message
    SQSBackend.is_message_valid_based_on_retention_period = _within_retention_period


def start_sqs_server(port: int) -> ThreadedMotoServer:
    _lighten_moto_sqs()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server
