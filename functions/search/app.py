"""The search function: text and image search over a dataset (HTTP API v2 events)."""

from __future__ import annotations

from clipsearch.http.routes import search_api
from clipsearch.wiring import get_search_service

app = search_api(get_search_service)


def handler(event: dict, context) -> dict:
    return app.resolve(event, context)
