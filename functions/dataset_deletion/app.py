"""The dataset deletion worker: deletion tasks from its queue (one per message), and on a schedule the stalled ones."""

from __future__ import annotations

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from clipsearch.dataset_service import DatasetService, parse_task_message
from clipsearch.observability import FunctionTelemetry, observed_handler
from clipsearch.wiring import get_dataset_service

telemetry = FunctionTelemetry.for_function("dataset_deletion")
metrics = telemetry.metrics

# A page (1000 deletes, or 10,000 rows) takes about a second; stopping this long before the timeout leaves
# time to release the lease and queue the rest.
STOP_BEFORE_TIMEOUT_MS = 30_000


@observed_handler(telemetry, correlation_id_path=correlation_paths.EVENT_BRIDGE)
def handler(event: dict, context) -> dict:
    return handle(event, context, get_dataset_service())


def handle(event: dict, context, service: DatasetService) -> dict:
    """A failure raises: Lambda returns the message to the queue, and its next delivery resumes the task."""

    def has_time() -> bool:
        return context.get_remaining_time_in_millis() > STOP_BEFORE_TIMEOUT_MS

    if event.get("source") == "aws.events":  # the schedule: deletions whose worker died or message was lost
        resumed = service.resume_stalled(has_time)
        metrics.add_metric("DeletionsResumed", MetricUnit.Count, len(resumed))
        return {"resumed": resumed}
    outcomes = []
    for record in event["Records"]:
        task = parse_task_message(record["body"])
        outcome = service.continue_deletion(task, has_time)
        metrics.add_metric(f"Deletions{outcome.value.capitalize()}", MetricUnit.Count, 1)
        outcomes.append({"dataset": task.dataset, "outcome": outcome.value})
    return {"tasks": outcomes}
