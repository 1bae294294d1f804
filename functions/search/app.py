"""The search function: text and image search over a dataset (HTTP API v2 events)."""

from __future__ import annotations

from clipsearch.wiring import get_search_service, start_search_function

start_search_function()  # first: the text model and the catalog get ready while the imports below run

from aws_lambda_powertools.logging import correlation_paths  # noqa: E402
from clipsearch.http.routes import search_api  # noqa: E402
from clipsearch.observability import FunctionTelemetry, observed_handler  # noqa: E402

telemetry = FunctionTelemetry.for_function("search")
app = search_api(get_search_service, telemetry)


@observed_handler(telemetry, correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
def handler(event: dict, context) -> dict:
    return app.resolve(event, context)
