"""The datasets function: list, describe and delete datasets (HTTP API v2 events)."""

from __future__ import annotations

from clipsearch.http.routes import datasets_api
from clipsearch.wiring import get_dataset_service

app = datasets_api(get_dataset_service)


def handler(event: dict, context) -> dict:
    return app.resolve(event, context)
