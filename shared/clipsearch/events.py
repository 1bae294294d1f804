"""S3 event notifications (inside SQS message bodies) <-> ObjectEvents for the dataset images they name."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from clipsearch.datasets import has_image_suffix, parse_image_key
from clipsearch.errors import InvalidRequest
from clipsearch.ports import ObjectInfo

logger = logging.getLogger(__name__)

TEST_EVENT = "s3:TestEvent"


class EventKind(Enum):
    CREATED = "created"
    REMOVED = "removed"


@dataclass(frozen=True)
class ObjectEvent:
    """One image created or removed under `datasets/<dataset>/`, from the SQS message `message_id`.

    `size` is the byte size the notification announced (S3 sends it for created objects).
    """

    message_id: str
    kind: EventKind
    bucket: str
    key: str
    dataset: str
    etag: str | None
    size: int | None = None


def parse_message(message_id: str, body: str) -> list[ObjectEvent]:
    """The dataset-image events in one SQS message body; logs and drops everything else.

    Raises InvalidRequest for a body that is not an S3 notification, or holds a record of the wrong
    shape: only that message fails, and the queue hands it to its dead-letter queue after its retries.
    """
    try:
        notification = json.loads(body)
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"message {message_id} is not JSON: {error}") from error
    if not isinstance(notification, dict):
        raise InvalidRequest(f"message {message_id} is not an S3 notification")
    if notification.get("Event") == TEST_EVENT:
        logger.info("skipping %s in message %s", TEST_EVENT, message_id)
        return []
    if not isinstance(notification.get("Records"), list):
        raise InvalidRequest(f"message {message_id} has no S3 Records")
    events = []
    for record in notification["Records"]:
        event = _parse_record(message_id, record)
        if event is not None:
            events.append(event)
    return events


def _parse_record(message_id: str, record: object) -> ObjectEvent | None:
    if not isinstance(record, dict):
        raise InvalidRequest(f"message {message_id} has an S3 record that is not an object")
    name = record.get("eventName", "")
    s3 = _field(message_id, record, "s3", dict)
    bucket = _field(message_id, _field(message_id, s3, "bucket", dict), "name", str)
    stored = _field(message_id, s3, "object", dict)
    raw_key = _field(message_id, stored, "key", str)
    if not isinstance(name, str):
        raise InvalidRequest(f"message {message_id} has an S3 record whose eventName is not a string")
    if name.startswith("ObjectCreated:"):
        kind = EventKind.CREATED
    elif name.startswith("ObjectRemoved:"):
        kind = EventKind.REMOVED
    else:
        logger.info("ignoring event %r for %r in message %s", name, raw_key, message_id)
        return None
    key = unquote_plus(raw_key)
    image = parse_image_key(key)
    if image is None:
        logger.info("ignoring %r: not under datasets/<dataset>/ with a valid dataset name", key)
        return None
    if not has_image_suffix(key):
        logger.info("ignoring %r: not an image file name", key)
        return None
    etag = stored.get("eTag") or stored.get("etag")
    size = stored.get("size")
    if not (etag is None or isinstance(etag, str)) or not (size is None or _is_count(size)):
        raise InvalidRequest(f"message {message_id} has an S3 record of {key!r} with a malformed eTag or size")
    return ObjectEvent(message_id, kind, bucket, key, image.dataset, etag, size)


def _field(message_id: str, parent: Mapping, name: str, kind: type) -> Any:
    value = parent.get(name)
    if not isinstance(value, kind):
        raise InvalidRequest(f"message {message_id} has an S3 record without a valid {name!r}")
    return value


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def created_notification(bucket: str, objects: Sequence[ObjectInfo]) -> str:
    """An S3-notification-shaped body announcing `objects` (how reconciliation feeds the queue)."""
    return json.dumps(
        {
            "Records": [
                {
                    "eventVersion": "2.1",
                    "eventSource": "aws:s3",
                    "eventName": "ObjectCreated:Put",
                    "s3": {
                        "bucket": {"name": bucket},
                        "object": {"key": quote_plus(item.key, safe="/"), "eTag": item.etag,
                                   "size": item.size},
                    },
                }
                for item in objects
            ]
        }
    )


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
