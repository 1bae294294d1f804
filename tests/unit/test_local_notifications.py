"""`read_events` on the shapes `weed filer.meta.tail` may print: pretty-printed, compact, split anywhere."""

from __future__ import annotations

import io
import json

import pytest

from clipsearch_tools.local.notifications import read_events

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
