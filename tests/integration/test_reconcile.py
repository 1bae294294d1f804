"""Reconciliation finds what events missed: unindexed, replaced and removed objects, via the queue."""

from __future__ import annotations

import pytest
from clipsearch.adapters.sqs_queue import SqsQueue
from clipsearch.reconcile import ReconcileService
from http_events import load_function
from ingest_stack import CONTEXT, ingest_stack, preprocess_function

pytestmark = pytest.mark.integration
__all__ = ["ingest_stack"]

DATASET = "wildlife_photos"


def test_reconciliation_recovers_lost_events(ingest_stack, seed_eval_photos) -> None:
    stack, preprocess = ingest_stack, preprocess_function()
    photos = [path.read_bytes() for path in seed_eval_photos[:6]]
    stack.upload(f"datasets/{DATASET}/a.jpg", photos[0])
    stack.upload(f"datasets/{DATASET}/b.jpg", photos[1])
    preprocess.handle(stack.drain(), CONTEXT, stack.service())

    # events lost: new images, a replaced one, a deleted one, and a dataset nobody indexed yet
    stack.upload(f"datasets/{DATASET}/c.jpg", photos[2])
    stack.upload(f"datasets/{DATASET}/sub/d e.jpg", photos[3])
    new_b = stack.upload(f"datasets/{DATASET}/b.jpg", photos[4])
    stack.s3.delete_object(Bucket=stack.bucket, Key=f"datasets/{DATASET}/a.jpg")
    stack.upload("datasets/preexisting/x.jpg", photos[5])
    stack.upload(f"datasets/{DATASET}/readme.txt", b"not an image")
    stack.drain()

    service = ReconcileService(stack.store, stack.catalog, SqsQueue(stack.sqs, stack.queue_url))
    result = load_function("reconcile").handle({}, service)

    assert result == {"datasets": [
        {"dataset": "preexisting", "scanned": 1, "enqueued": 1, "marked_deleted": 0},
        {"dataset": DATASET, "scanned": 3, "enqueued": 3, "marked_deleted": 1},
    ]}
    assert preprocess.handle(stack.drain(), CONTEXT, stack.service()) == {"batchItemFailures": []}
    live = {row["object_key"]: row["etag"] for row in stack.rows(DATASET) if row["status"] == "indexed"}
    assert set(live) == {f"datasets/{DATASET}/{name}" for name in ("b.jpg", "c.jpg", "sub/d e.jpg")}
    assert live[f"datasets/{DATASET}/b.jpg"] == new_b
    assert [row["status"] for row in stack.rows("preexisting")] == ["indexed"]

    again = service.reconcile_dataset(DATASET)
    assert (again.scanned, again.enqueued, again.marked_deleted) == (3, 0, 0)
