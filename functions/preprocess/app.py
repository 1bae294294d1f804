"""The preprocessing function: SQS batches of S3 notifications -> index segments + catalog rows."""

from __future__ import annotations

import time

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from clipsearch.errors import InvalidRequest, TransientError
from clipsearch.events import parse_message
from clipsearch.ingest import IngestService
from clipsearch.observability import FunctionTelemetry, observed_handler
from clipsearch.ports import MessageVisibility, PostponedMessage, RetryBackoff
from clipsearch.wiring import get_ingest_service, get_message_visibility

telemetry = FunctionTelemetry.for_function("preprocess")
logger, metrics = telemetry.logger, telemetry.metrics


# No correlation id: a batch holds up to 32 messages; each one's id is logged where it matters.
@observed_handler(telemetry)
def handler(event: dict, context) -> dict:
    return handle(event, context, get_ingest_service(), get_message_visibility())


def handle(event: dict, context, service: IngestService, visibility: MessageVisibility | None = None,
           backoff: RetryBackoff = RetryBackoff()) -> dict:
    """Embeds the whole batch together, then reports the messages to retry as batchItemFailures.

    Messages that failed transiently are also made visible again after `backoff`'s short delay; unreadable
    ones keep the queue's own timeout on their way to the dead-letter queue.
    """
    started = time.perf_counter()
    events, failures = [], {}
    for record in event["Records"]:
        try:
            events.extend(parse_message(record["messageId"], record["body"]))
        except InvalidRequest as error:  # left to the dead-letter queue, where someone can read it
            logger.error("unreadable message", extra={"message_id": record["messageId"], "error": str(error)})
            failures[record["messageId"]] = str(error)
    report = service.ingest(events)
    failures.update(report.retry)
    if visibility is not None and report.retry:
        postpone_transient_failures(event["Records"], report.retry, visibility, backoff)

    def record_handler(record: SQSRecord) -> None:
        if record.message_id in failures:
            raise TransientError(failures[record.message_id])

    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    response = process_partial_response(event, record_handler, processor, context)
    metrics.add_metric("ImagesIndexed", MetricUnit.Count, report.indexed)
    metrics.add_metric("ImagesFailed", MetricUnit.Count, report.failed)
    metrics.add_metric("ImagesRemoved", MetricUnit.Count, report.removed)
    metrics.add_metric("MessagesRetried", MetricUnit.Count, len(failures))
    metrics.add_metric("BatchLatency", MetricUnit.Milliseconds, (time.perf_counter() - started) * 1000)
    for name, seconds in (("FetchWaitSeconds", report.fetch_wait_seconds), ("ClaimSeconds", report.claim_seconds),
                          ("DecodeEmbedSeconds", report.embed_seconds), ("SegmentCommitSeconds", report.commit_seconds)):
        metrics.add_metric(name, MetricUnit.Seconds, seconds)
    for size in report.segment_bytes:
        metrics.add_metric("SegmentBytes", MetricUnit.Bytes, size)
    return response


def postpone_transient_failures(records: list[dict], retry: dict[str, str], visibility: MessageVisibility,
                                backoff: RetryBackoff) -> None:
    by_source: dict[str, list[PostponedMessage]] = {}
    for record in records:
        if record["messageId"] in retry and record.get("receiptHandle") and record.get("eventSourceARN"):
            receives = int((record.get("attributes") or {}).get("ApproximateReceiveCount") or 1)
            by_source.setdefault(record["eventSourceARN"], []).append(
                PostponedMessage(record["receiptHandle"], backoff.delay_seconds(receives)))
    for source, messages in by_source.items():
        try:
            visibility.postpone(source, messages)
        except Exception as error:  # only the retry comes later (the queue's own timeout): never fail the batch
            logger.warning("cannot shorten the retry delay", extra={"queue": source, "messages": len(messages),
                                                                   "error": str(error)})
