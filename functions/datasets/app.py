"""The datasets function: list, describe and delete datasets (HTTP API v2 events)."""

from __future__ import annotations

from aws_lambda_powertools.logging import correlation_paths
from clipsearch.http.routes import datasets_api
from clipsearch.observability import FunctionTelemetry, observed_handler
from clipsearch.wiring import get_dataset_service

telemetry = FunctionTelemetry.for_function("datasets")
app = datasets_api(get_dataset_service)


@observed_handler(telemetry, correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
def handler(event: dict, context) -> dict:
    return app.resolve(event, context)
