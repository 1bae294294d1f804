"""`read_events` on the shapes `weed filer.meta.tail` may print: pretty-printed, compact, split anywhere."""

from __future__ import annotations

import io
import json

import pytest

from clipsearch_tools.local.notifications import read_events
from clipsearch_tools.local.seaweed import tail_prefix
from clipsearch_tools.local.template import NotificationRule

pytestmark = pytest.mark.unit

EVENTS = [
    {"directory": "/buckets/b/datasets/d", "eventNotification": {"newEntry": {"name": f"{index}}}.jpg",
                                                                              "chunks": [{"size": 1}]}},
     "tsNs": str(index)}
    for index in range(3)
]


def names(text: str) -> list[str]:
    return [event["eventNotification"]["newEntry"]["name"] for event in read_events(io.StringIO(text))]


def test_compact_objects_one_per_line_and_back_to_back_on_one_line() -> None:
    expected = ["0}.jpg", "1}.jpg", "2}.jpg"]
    assert names("".join(json.dumps(event) + "\n" for event in EVENTS)) == expected
    assert names("".join(json.dumps(event) for event in EVENTS) + "\n") == expected


def test_pretty_printed_objects_are_read_only_once_complete() -> None:
    text = "".join(json.dumps(event, indent=2) + "\n" for event in EVENTS)
    assert names(text) == ["0}.jpg", "1}.jpg", "2}.jpg"]
    assert names(text[: text.rindex("}")]) == ["0}.jpg", "1}.jpg"]  # the last object is cut short


def test_objects_split_across_pieces_of_any_size_as_a_pipe_read_returns_them() -> None:
    text = "".join(json.dumps(event, indent=2) + "\n" for event in EVENTS)
    for size in (1, 7, 64, len(text)):
        pieces = [text[start:start + size] for start in range(0, len(text), size)]
        assert [event["eventNotification"]["newEntry"]["name"] for event in read_events(iter(pieces))] == \
            ["0}.jpg", "1}.jpg", "2}.jpg"]


def test_the_tail_follows_the_rules_common_prefix_or_the_whole_bucket() -> None:
    created = NotificationRule("s3:ObjectCreated:*", "datasets/", "")
    removed = NotificationRule("s3:ObjectRemoved:*", "datasets/", ".jpg")
    assert tail_prefix("b", (created, removed)) == "/buckets/b/datasets/"
    assert tail_prefix("b", (created, NotificationRule("s3:ObjectCreated:*", "", ""))) == "/buckets/b/"
    assert tail_prefix("b", ()) == "/buckets/b/"
