"""S3 notifications in SQS bodies -> ObjectEvents: decoding, filtering, and the reconciliation inverse."""

from __future__ import annotations

import json

import pytest
from clipsearch.errors import InvalidRequest
from clipsearch.events import EventKind, created_notification, parse_message
from clipsearch.ports import ObjectInfo

pytestmark = pytest.mark.unit


def record(name: str, key: str, etag: str | None = "abc") -> dict:
    obj = {"key": key, "size": 10}
    if etag:
        obj["eTag"] = etag
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": name,
        "s3": {"bucket": {"name": "photos", "arn": "arn:aws:s3:::photos"}, "object": obj},
    }


def body(*records: dict) -> str:
    return json.dumps({"Records": list(records)})


def test_several_records_per_body_with_encoded_keys() -> None:
    events = parse_message("m1", body(
        record("ObjectCreated:Put", "datasets/wildlife_photos/my+cat+%281%29.jpg"),
        record("ObjectCreated:CompleteMultipartUpload", "datasets%2FtestDataset%2Fsub%2Fdog.PNG", "e2"),
        record("ObjectRemoved:Delete", "datasets/testDataset/gone.webp", None),
    ))
    assert [(e.kind, e.dataset, e.key, e.etag) for e in events] == [
        (EventKind.CREATED, "wildlife_photos", "datasets/wildlife_photos/my cat (1).jpg", "abc"),
        (EventKind.CREATED, "testDataset", "datasets/testDataset/sub/dog.PNG", "e2"),
        (EventKind.REMOVED, "testDataset", "datasets/testDataset/gone.webp", None),
    ]
    assert {(e.message_id, e.bucket) for e in events} == {("m1", "photos")}


def test_test_event_is_skipped() -> None:
    assert parse_message("m1", json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})) == []


@pytest.mark.parametrize("key, why", [
    ("indexes/ds/segments/x.faiss", "not under datasets/"),
    ("datasets/-bad/x.jpg", "not under datasets/"),
    ("datasets/ds/notes.txt", "not an image"),
    ("datasets/ds/", "not under datasets/"),
    ("datasets/ds/folder/", "not under datasets/"),
])
def test_keys_outside_datasets_or_not_images_are_ignored_with_a_reason(key, why, caplog) -> None:
    caplog.set_level("INFO", logger="clipsearch.events")
    assert parse_message("m1", body(record("ObjectCreated:Put", key))) == []
    assert why in caplog.text


def test_malformed_bodies_are_rejected() -> None:
    with pytest.raises(InvalidRequest, match="not JSON"):
        parse_message("m1", "{nope")
    with pytest.raises(InvalidRequest, match="no S3 Records"):
        parse_message("m1", json.dumps({"hello": 1}))


def test_reconciliation_notification_round_trips() -> None:
    objects = [ObjectInfo("datasets/ds/a b+c.jpg", "e1", 5), ObjectInfo("datasets/ds/x/é.png", "e2", 7)]
    events = parse_message("m9", created_notification("photos", objects))
    assert [(e.key, e.etag, e.kind) for e in events] == [
        ("datasets/ds/a b+c.jpg", "e1", EventKind.CREATED),
        ("datasets/ds/x/é.png", "e2", EventKind.CREATED),
    ]


@pytest.mark.parametrize("records", [
    [1],
    ["ObjectCreated:Put"],
    [{"eventName": "ObjectCreated:Put", "s3": []}],
    [{"eventName": "ObjectCreated:Put", "s3": {"bucket": "photos", "object": {"key": "datasets/ds/a.jpg"}}}],
    [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "photos"}, "object": {"key": 5}}}],
    [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "photos"}, "object": "datasets/ds/a.jpg"}}],
    [{"eventName": 7, "s3": {"bucket": {"name": "photos"}, "object": {"key": "datasets/ds/a.jpg"}}}],
    [{"eventName": "ObjectCreated:Put",
      "s3": {"bucket": {"name": "photos"}, "object": {"key": "datasets/ds/a.jpg", "eTag": ["x"]}}}],
    [{"eventName": "ObjectCreated:Put",
      "s3": {"bucket": {"name": "photos"}, "object": {"key": "datasets/ds/a.jpg", "size": "12"}}}],
])
def test_records_of_the_wrong_shape_are_rejected_as_invalid(records) -> None:
    with pytest.raises(InvalidRequest, match="m1"):
        parse_message("m1", json.dumps({"Records": records}))


def test_the_announced_size_is_carried() -> None:
    (created,) = parse_message("m1", body(record("ObjectCreated:Put", "datasets/ds/a.jpg")))
    (removed,) = parse_message("m1", json.dumps({"Records": [{
        "eventName": "ObjectRemoved:Delete",
        "s3": {"bucket": {"name": "photos"}, "object": {"key": "datasets/ds/a.jpg"}},
    }]}))
    assert (created.size, removed.size) == (10, None)
