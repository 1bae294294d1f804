"""The reconciliation function: {"dataset": name} or every dataset; enqueues what events missed."""

from __future__ import annotations

from dataclasses import asdict

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from clipsearch.observability import FunctionTelemetry, observed_handler
from clipsearch.reconcile import ReconcileService
from clipsearch.wiring import get_reconcile_service

telemetry = FunctionTelemetry.for_function("reconcile")
metrics = telemetry.metrics


# The correlation id is the scheduled event's id (EventBridge); a direct invocation has none.
@observed_handler(telemetry, correlation_id_path=correlation_paths.EVENT_BRIDGE)
def handler(event: dict, context) -> dict:
    return handle(event, get_reconcile_service())


def handle(event: dict, service: ReconcileService) -> dict:
    dataset = event.get("dataset")
    reports = [service.reconcile_dataset(dataset)] if dataset else service.reconcile_all()
    for report in reports:
        metrics.add_metric("ImagesEnqueued", MetricUnit.Count, report.enqueued)
        metrics.add_metric("ImagesMarkedDeleted", MetricUnit.Count, report.marked_deleted)
    return {"datasets": [asdict(report) for report in reports]}
