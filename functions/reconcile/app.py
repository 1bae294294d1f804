"""The reconciliation function: {"dataset": name} or every dataset; enqueues what events missed."""

from __future__ import annotations

from dataclasses import asdict

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from clipsearch.reconcile import ReconcileService
from clipsearch.wiring import get_reconcile_service

logger = Logger(service="clipsearch-reconcile")
metrics = Metrics(namespace="clipsearch", service="reconcile")


@metrics.log_metrics
@logger.inject_lambda_context
def handler(event: dict, context) -> dict:
    return handle(event, get_reconcile_service())


def handle(event: dict, service: ReconcileService) -> dict:
    dataset = event.get("dataset")
    reports = [service.reconcile_dataset(dataset)] if dataset else service.reconcile_all()
    for report in reports:
        metrics.add_metric("ImagesEnqueued", MetricUnit.Count, report.enqueued)
        metrics.add_metric("ImagesMarkedDeleted", MetricUnit.Count, report.marked_deleted)
    return {"datasets": [asdict(report) for report in reports]}
