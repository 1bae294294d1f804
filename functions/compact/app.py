"""The compaction function: on a schedule (all datasets) or for {"dataset": name, "force": bool}.

Each invocation writes at most the policy's segments_per_run segments; what is left (GroupsPending) is
merged by the next scheduled invocations.
"""

from __future__ import annotations

from dataclasses import asdict

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from clipsearch.compaction import CompactionService
from clipsearch.observability import FunctionTelemetry, observed_handler
from clipsearch.wiring import get_compaction_service

telemetry = FunctionTelemetry.for_function("compact")
metrics = telemetry.metrics


# The correlation id is the scheduled event's id (EventBridge); a direct invocation has none.
@observed_handler(telemetry, correlation_id_path=correlation_paths.EVENT_BRIDGE)
def handler(event: dict, context) -> dict:
    return handle(event, get_compaction_service())


def handle(event: dict, service: CompactionService) -> dict:
    force = bool(event.get("force", False))
    dataset = event.get("dataset")
    reports = [service.compact_dataset(dataset, force)] if dataset else service.compact_all(force)
    for report in reports:
        metrics.add_metric("SegmentsMerged", MetricUnit.Count, report.merged_segments)
        metrics.add_metric("SegmentsWritten", MetricUnit.Count, report.segments_written)
        metrics.add_metric("GroupsPending", MetricUnit.Count, report.groups_pending)
        metrics.add_metric("VectorsDropped", MetricUnit.Count, report.vectors_dropped)
        metrics.add_metric("SegmentObjectsRemoved", MetricUnit.Count, report.objects_removed)
    return {"datasets": [asdict(report) for report in reports]}
