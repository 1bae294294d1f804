"""Reconciliation finds what events missed: unindexed, replaced and removed objects, via the queue."""

from __future__ import annotations

import pytest
from clipsearch.adapters.postgres_catalog import PostgresCatalog
from clipsearch.adapters.s3_store import S3ObjectStore
from clipsearch.adapters.sqs_queue import SqsQueue
from clipsearch.errors import MaintenanceFailed, TransientError
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


class ListedBeforeUpload(S3ObjectStore):
    """A listing taken just before `late_key` was uploaded again: it does not show that key."""

    def __init__(self, client, bucket: str, late_key: str) -> None:
        super().__init__(client, bucket)
        self._late_key = late_key

    def list(self, prefix: str):
        return (item for item in super().list(prefix) if item.key != self._late_key)


def test_a_key_uploaded_again_after_the_listing_is_not_removed(ingest_stack, seed_eval_photos) -> None:
    stack, preprocess = ingest_stack, preprocess_function()
    key = f"datasets/{DATASET}/a.jpg"
    stack.upload(key, seed_eval_photos[0].read_bytes())
    preprocess.handle(stack.drain(), CONTEXT, stack.service())
    store = ListedBeforeUpload(stack.s3, stack.bucket, key)
    report = ReconcileService(store, stack.catalog, SqsQueue(stack.sqs, stack.queue_url)).reconcile_dataset(DATASET)
    assert report.marked_deleted == 0
    assert [row["status"] for row in stack.rows(DATASET)] == ["indexed"]


class FailingFor(PostgresCatalog):
    """Its removals fail for one dataset, like a catalog error confined to that dataset."""

    def __init__(self, database, dataset: str) -> None:
        super().__init__(database)
        self._dataset = dataset

    def remove_images(self, dataset, key, keep_etag):
        if dataset == self._dataset:
            raise TransientError("injected")
        return super().remove_images(dataset, key, keep_etag)


def test_one_failing_dataset_does_not_stop_the_others(ingest_stack, seed_eval_photos) -> None:
    stack, preprocess = ingest_stack, preprocess_function()
    for dataset in ("a_first", "b_second"):
        stack.upload(f"datasets/{dataset}/x.jpg", seed_eval_photos[0].read_bytes())
    preprocess.handle(stack.drain(), CONTEXT, stack.service())
    for dataset in ("a_first", "b_second"):
        stack.s3.delete_object(Bucket=stack.bucket, Key=f"datasets/{dataset}/x.jpg")
    stack.drain()
    service = ReconcileService(stack.store, FailingFor(stack.database, "a_first"),
                               SqsQueue(stack.sqs, stack.queue_url))
    with pytest.raises(MaintenanceFailed, match="a_first"):
        service.reconcile_all()
    assert [row["status"] for row in stack.rows("b_second")] == ["deleted"]
    assert [row["status"] for row in stack.rows("a_first")] == ["indexed"]
