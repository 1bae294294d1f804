"""The shard search function: one shard of a dataset over the search function's budget, asked by the search function."""

from __future__ import annotations

from clipsearch.observability import FunctionTelemetry, observed_handler
from clipsearch.search import ShardSearchService
from clipsearch.shards import query_from_payload, ranking_payload
from clipsearch.wiring import get_shard_search_service

telemetry = FunctionTelemetry.for_function("shard_search")


@observed_handler(telemetry)
def handler(event: dict, context) -> dict:
    return handle(event, get_shard_search_service())


def handle(event: dict, service: ShardSearchService) -> dict:
    """{"hits": [[image id, score], ...]} for a query payload (clipsearch.shards.query_payload)."""
    return ranking_payload(service.search(query_from_payload(event)))
