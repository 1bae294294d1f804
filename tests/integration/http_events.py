"""HTTP API v2 events from tests/events/, filled in per request, and a stand-in for the Lambda context."""

from __future__ import annotations

import base64
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from urllib.parse import urlencode

EVENTS = Path(__file__).resolve().parent.parent / "events"
FUNCTIONS = Path(__file__).resolve().parent.parent.parent / "functions"


@dataclass
class LambdaContext:
    function_name: str = "clipsearch-test"
    memory_limit_in_mb: int = 2048
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:clipsearch-test"
    aws_request_id: str = "00000000-0000-0000-0000-000000000000"


def http_event(
    name: str,
    *,
    dataset: str | None = None,
    body: dict | bytes | str | None = None,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> dict:
    """The fixture `name` with `{dataset}` filled in, and the body, query and headers replaced when given."""
    text = (EVENTS / f"{name}.json").read_text(encoding="utf-8")
    if dataset is not None:
        text = text.replace("{dataset}", dataset)
    event = json.loads(text)
    if isinstance(body, dict):
        event["body"], event["isBase64Encoded"] = json.dumps(body), False
    elif isinstance(body, bytes):
        event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode("ascii"), True
    elif isinstance(body, str):
        event["body"], event["isBase64Encoded"] = body, False
    if query is not None:
        event["queryStringParameters"] = dict(query)
        event["rawQueryString"] = urlencode(query)
    if headers:
        event["headers"] = {**event["headers"], **{key.lower(): value for key, value in headers.items()}}
    if "content-length" in event["headers"]:
        event["headers"]["content-length"] = str(len(event.get("body") or ""))
    return event


def load_function(name: str) -> ModuleType:
    """functions/<name>/app.py as its own module (every function's module is called `app`)."""
    spec = importlib.util.spec_from_file_location(f"function_{name}_app", FUNCTIONS / name / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def invoke(function: ModuleType, event: dict) -> tuple[int, dict]:
    """Calls the handler; returns the status code and the decoded JSON body."""
    response = function.handler(event, LambdaContext())
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode("utf-8")
    return response["statusCode"], (json.loads(body) if body else {})
