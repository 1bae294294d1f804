"""Filer metadata events -> S3 notifications, and requests -> HTTP API v2 events, as the local stack builds them."""

from __future__ import annotations

import base64
import io
import json

import pytest
from clipsearch.events import EventKind, parse_message
from clipsearch_tools.local.gateway import http_api_event, http_response
from clipsearch_tools.local.notifications import read_events, s3_records
from clipsearch_tools.local.template import Function, NotificationRule, Route

pytestmark = pytest.mark.unit

BUCKET = "clipsearch-local"
RULES = (NotificationRule("s3:ObjectCreated:*", "datasets/", ""), NotificationRule("s3:ObjectRemoved:*", "datasets/", ""))
ETAG = "398533d48111e9f664b1f64cb10c4b63"


def _entry(name: str, *, directory: bool = False, etag: str | None = ETAG, size: int = 1000) -> dict:
    """An entry as `weed filer.meta.tail` prints it (fields the translation reads, as SeaweedFS 4.48 writes them)."""
    extended = {"Seaweed-X-Amz-ETag": base64.b64encode(etag.encode()).decode()} if etag else {}
    return {"name": name, "isDirectory": directory, "attributes": {"fileSize": str(size), "md5": ""},
            "extended": extended}


def _event(directory: str, old: dict | None, new: dict | None, new_parent: str = "") -> dict:
    return {"directory": directory, "eventNotification": {"oldEntry": old, "newEntry": new,
                                                          "newParentPath": new_parent or directory},
            "tsNs": "1795792335815169606"}


def _events_of(records: list[dict]) -> list:
    return parse_message("m1", json.dumps({"Records": records}))


def test_a_new_file_is_an_object_created_record_the_ingest_parser_reads():
    records = s3_records(_event(f"/buckets/{BUCKET}/datasets/d/a b", None, _entry("x 1.jpg")), BUCKET, RULES)
    assert [record["eventName"] for record in records] == ["ObjectCreated:Put"]
    assert records[0]["s3"]["object"]["key"] == "datasets/d/a+b/x+1.jpg"  # URL-encoded like S3's
    (event,) = _events_of(records)
    assert (event.kind, event.key, event.dataset, event.etag) == (EventKind.CREATED, "datasets/d/a b/x 1.jpg", "d", ETAG)


def test_an_overwrite_is_created_and_a_removal_is_removed():
    path = f"/buckets/{BUCKET}/datasets/d"
    overwrite = s3_records(_event(path, _entry("x.jpg", etag="old"), _entry("x.jpg")), BUCKET, RULES)
    assert [record["eventName"] for record in overwrite] == ["ObjectCreated:Put"]
    removal = s3_records(_event(path, _entry("x.jpg"), None), BUCKET, RULES)
    assert [(event.kind, event.key) for event in _events_of(removal)] == [(EventKind.REMOVED, "datasets/d/x.jpg")]


def test_directories_multipart_parts_other_buckets_and_unfiltered_keys_send_nothing():
    assert s3_records(_event(f"/buckets/{BUCKET}/datasets", None, _entry("d", directory=True)), BUCKET, RULES) == []
    part = _event(f"/buckets/{BUCKET}/.uploads/abc", None, _entry("0001_x.part"))
    assert s3_records(part, BUCKET, RULES) == []
    assert s3_records(_event("/buckets/other/datasets/d", None, _entry("x.jpg")), BUCKET, RULES) == []
    assert s3_records(_event(f"/buckets/{BUCKET}/models/m", None, _entry("manifest.json")), BUCKET, RULES) == []


def test_a_multipart_etag_is_kept_as_s3_gives_it():
    records = s3_records(_event(f"/buckets/{BUCKET}/datasets/d", None, _entry("big.jpg", etag=f"{ETAG}-2")), BUCKET, RULES)
    assert records[0]["s3"]["object"]["eTag"] == f"{ETAG}-2"


def test_read_events_splits_pretty_printed_objects_across_lines():
    first, second = _event("/a", None, _entry("1.jpg")), _event("/a", None, _entry("2.jpg"))
    stream = io.StringIO(json.dumps(first, indent=2) + "\n" + json.dumps(second, indent=2) + "\n")
    assert [event["eventNotification"]["newEntry"]["name"] for event in read_events(stream)] == ["1.jpg", "2.jpg"]


ROUTE = Route("POST", "/datasets/{dataset}/search/image", Function("Search", None, "app.handler", 29))


def test_http_api_event_has_v2_fields_and_base64_for_binary_bodies():
    image = b"\xff\xd8\xff\xe0binary"
    event = http_api_event(
        ROUTE, "POST", "/datasets/my%20set/search/image", "k=3&k=4", {"Content-Type": "image/jpeg", "Host": "h"},
        image, {"dataset": "my%20set"}, "127.0.0.1",
    )
    assert event["version"] == "2.0"
    assert event["routeKey"] == event["requestContext"]["routeKey"] == "POST /datasets/{dataset}/search/image"
    assert event["headers"]["content-type"] == "image/jpeg"
    assert event["pathParameters"] == {"dataset": "my set"}
    assert event["queryStringParameters"] == {"k": "3,4"}
    assert event["requestContext"]["http"]["method"] == "POST"
    assert event["isBase64Encoded"] is True and base64.b64decode(event["body"]) == image


def test_http_api_event_keeps_json_bodies_as_text():
    event = http_api_event(ROUTE, "POST", "/x", "", {"content-type": "application/json"}, b'{"k": 1}', {}, "::1")
    assert (event["body"], event["isBase64Encoded"]) == ('{"k": 1}', False)
    assert "queryStringParameters" not in event and "pathParameters" not in event


def test_http_response_reads_status_headers_and_base64_bodies():
    status, headers, body = http_response(
        {"statusCode": 201, "headers": {"Content-Type": "image/png"}, "body": base64.b64encode(b"png").decode(),
         "isBase64Encoded": True}
    )
    assert (status, headers["content-type"], body) == (201, "image/png", b"png")
    assert http_response({"answer": 42}) == (200, {"content-type": "application/json"}, b'{"answer": 42}')
