"""Upload -> bucket notification -> SQS -> the preprocessing handler -> catalog rows and FAISS segments."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from boto3.s3.transfer import TransferConfig
from clipsearch.adapters.postgres_catalog import PostgresCatalog
from clipsearch.adapters.postgres_connection import Database
from clipsearch.errors import TransientError
from clipsearch.segments import load_segment
from ingest_stack import (
    CONTEXT,
    failed_ids,
    ingest_stack,
    notification_body,
    preprocess_function,
    records_of,
)

pytestmark = pytest.mark.integration
__all__ = ["ingest_stack"]

DATASET = "wildlife_photos"


@pytest.fixture(scope="module")
def preprocess():
    return preprocess_function()


def photo(photos: list[Path], index: int) -> bytes:
    return photos[index].read_bytes()


def test_uploads_become_searchable_segments(ingest_stack, preprocess, seed_eval_photos) -> None:
    stack = ingest_stack
    stack.upload(f"datasets/{DATASET}/my cat (1).jpg", photo(seed_eval_photos, 0), "/home/me/my cat (1).jpg")
    stack.upload(f"datasets/{DATASET}/sub/dir/b.jpeg", photo(seed_eval_photos, 1))
    stack.upload(f"datasets/{DATASET}/notes.txt", b"not indexed")
    stack.upload("elsewhere/c.jpg", photo(seed_eval_photos, 2))
    event = stack.drain()
    assert "datasets%2F" in str(notification_body(event)) or "my+cat" in str(notification_body(event))

    response = preprocess.handle(event, CONTEXT, stack.service())

    assert response == {"batchItemFailures": []}
    dataset = stack.catalog.get_dataset(DATASET)
    assert (dataset.model_id, dataset.index_version) == (stack.model_id, 1)
    rows = {row["object_key"]: row for row in stack.rows(DATASET)}
    assert set(rows) == {f"datasets/{DATASET}/my cat (1).jpg", f"datasets/{DATASET}/sub/dir/b.jpeg"}
    cat = rows[f"datasets/{DATASET}/my cat (1).jpg"]
    assert cat["status"] == "indexed" and cat["source_path"] == "/home/me/my cat (1).jpg"
    assert cat["byte_size"] == len(photo(seed_eval_photos, 0)) and cat["width"] > 0 and cat["height"] > 0
    (segment,) = stack.catalog.live_segments(dataset.id)
    assert segment.vector_count == 2 and segment.object_key.startswith(f"indexes/{DATASET}/segments/")
    # the segment finds each photo by the photo's own embedding, under the image's catalog id
    index = load_segment(stack.store.get(segment.object_key).data)
    query = stack.encoder.embed_image(photo(seed_eval_photos, 0), "query").vector
    scores, ids = index.search(query[np.newaxis, :], 2)
    assert ids[0, 0] == cat["id"] and scores[0, 0] == pytest.approx(1.0, abs=1e-4)


def test_repeated_and_multipart_events_leave_one_indexed_image(ingest_stack, preprocess, seed_eval_photos) -> None:
    stack = ingest_stack
    big = photo(seed_eval_photos, 3) + b"\0" * (6 * 1024 * 1024)  # bytes after the JPEG end are ignored
    stack.s3.upload_fileobj(
        io.BytesIO(big), stack.bucket, f"datasets/{DATASET}/big.jpg",
        Config=TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024),
    )
    event = stack.drain()
    names = [record["eventName"] for record in notification_body(event)]
    assert "ObjectCreated:CompleteMultipartUpload" in names

    for _ in range(3):  # the queue delivers at least once
        assert preprocess.handle(event, CONTEXT, stack.service()) == {"batchItemFailures": []}

    rows = stack.rows(DATASET)
    assert [(row["status"], row["etag"].endswith("-2")) for row in rows] == [("indexed", True)]
    assert stack.live_vectors(DATASET) == {rows[0]["id"]: 1}
    assert stack.catalog.get_dataset(DATASET).index_version == 1


def test_delete_and_replace(ingest_stack, preprocess, seed_eval_photos) -> None:
    stack = ingest_stack
    stack.upload(f"datasets/{DATASET}/a.jpg", photo(seed_eval_photos, 0))
    stack.upload(f"datasets/{DATASET}/b.jpg", photo(seed_eval_photos, 1))
    preprocess.handle(stack.drain(), CONTEXT, stack.service())
    first = {row["object_key"]: row["id"] for row in stack.rows(DATASET)}

    stack.s3.delete_object(Bucket=stack.bucket, Key=f"datasets/{DATASET}/a.jpg")
    new_etag = stack.upload(f"datasets/{DATASET}/b.jpg", photo(seed_eval_photos, 2))
    assert preprocess.handle(stack.drain(), CONTEXT, stack.service()) == {"batchItemFailures": []}

    rows = stack.rows(DATASET)
    live = [row for row in rows if row["status"] == "indexed"]
    assert [(row["object_key"], row["etag"]) for row in live] == [(f"datasets/{DATASET}/b.jpg", new_etag)]
    assert live[0]["id"] not in first.values()  # new content, new vector id
    dataset = stack.catalog.get_dataset(DATASET)
    assert stack.catalog.deleted_image_ids(dataset.id) == set(first.values())
    assert all(row["deleted_version"] is not None for row in rows if row["status"] == "deleted")
    assert dataset.index_version == 3  # batch 1, the replacement, the removal


def test_corrupt_files_fail_without_retry_and_good_ones_index(ingest_stack, preprocess, seed_eval_photos) -> None:
    stack = ingest_stack
    for position in range(3):
        stack.upload(f"datasets/{DATASET}/good{position}.jpg", photo(seed_eval_photos, position))
    stack.upload(f"datasets/{DATASET}/text.jpg", b"this is not an image")
    stack.upload(f"datasets/{DATASET}/truncated.jpg", photo(seed_eval_photos, 4)[:300])
    event = stack.drain()

    assert preprocess.handle(event, CONTEXT, stack.service()) == {"batchItemFailures": []}
    assert preprocess.handle(event, CONTEXT, stack.service()) == {"batchItemFailures": []}

    statuses = {row["object_key"].rsplit("/", 1)[1]: (row["status"], row["failure_reason"])
                for row in stack.rows(DATASET)}
    assert {name for name, (status, _) in statuses.items() if status == "indexed"} == {
        "good0.jpg", "good1.jpg", "good2.jpg"}
    assert statuses["text.jpg"][0] == "failed" and statuses["text.jpg"][1]
    assert statuses["truncated.jpg"][0] == "failed" and statuses["truncated.jpg"][1]
    assert all(row["attempts"] == 1 for row in stack.rows(DATASET))
    summary = stack.catalog.summarize_dataset(DATASET)
    assert (summary.counts["indexed"], summary.counts["failed"]) == (3, 2)


class CrashingCommit(PostgresCatalog):
    """Dies once between the segment write and the commit, like a function timing out there."""

    crashes = 1

    def commit_batch(self, *args, **kwargs):
        if self.crashes:
            self.crashes -= 1
            raise TransientError("injected: the function died before its commit")
        return super().commit_batch(*args, **kwargs)


def test_crash_between_segment_write_and_commit_then_retry(ingest_stack, preprocess, seed_eval_photos) -> None:
    stack = ingest_stack
    for position in range(4):
        stack.upload(f"datasets/{DATASET}/p{position}.jpg", photo(seed_eval_photos, position))
    event = stack.drain()
    service = stack.service(CrashingCommit(stack.database))

    response = preprocess.handle(event, CONTEXT, service)
    assert sorted(failed_ids(response)) == sorted(record["messageId"] for record in event["Records"])
    assert {row["status"] for row in stack.rows(DATASET)} == {"pending"}
    orphans = list(stack.store.list(f"indexes/{DATASET}/segments/"))
    assert len(orphans) == 1  # object first: the segment exists, no row names it
    assert stack.catalog.live_segments(stack.catalog.get_dataset(DATASET).id) == []

    retry = records_of(event, failed_ids(response))
    assert preprocess.handle(retry, CONTEXT, service) == {"batchItemFailures": []}

    rows = stack.rows(DATASET)
    assert [(row["status"], row["attempts"]) for row in rows] == [("indexed", 2)] * 4
    assert stack.live_vectors(DATASET) == {row["id"]: 1 for row in rows}


class MeetBeforeCommit(PostgresCatalog):
    """Holds each batch at its first commit until the other batch gets there too, forcing the race."""

    def __init__(self, database: Database, barrier: threading.Barrier) -> None:
        super().__init__(database)
        self._barrier: threading.Barrier | None = barrier

    def commit_batch(self, *args, **kwargs):
        if self._barrier is not None:
            self._barrier.wait(timeout=60)
            self._barrier = None
        return super().commit_batch(*args, **kwargs)


def test_two_concurrent_batches_for_one_dataset(ingest_stack, preprocess, seed_eval_photos) -> None:
    stack = ingest_stack
    for position in range(6):
        stack.upload(f"datasets/{DATASET}/c{position}.jpg", photo(seed_eval_photos, position))
    records = stack.drain()["Records"]
    # both batches carry c2 and c3 (a redelivery racing the first delivery)
    batches = [{"Records": records[:4]}, {"Records": records[2:]}]
    barrier = threading.Barrier(2)
    responses: list[dict] = []
    databases = [Database(stack.database_url) for _ in batches]

    def run(event: dict, database: Database) -> None:
        responses.append(preprocess.handle(event, CONTEXT, stack.service(MeetBeforeCommit(database, barrier))))

    threads = [threading.Thread(target=run, args=pair) for pair in zip(batches, databases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for database in databases:
        database.close()

    assert responses == [{"batchItemFailures": []}] * 2
    rows = stack.rows(DATASET)
    assert sorted(row["object_key"][-6:] for row in rows) == [f"c{p}.jpg" for p in range(6)]
    assert {row["status"] for row in rows} == {"indexed"}
    held = stack.live_vectors(DATASET)
    assert held == {row["id"]: 1 for row in rows}  # no vector in two live segments
    segment_of = {row["id"]: row["segment_id"] for row in rows}
    assert len(set(segment_of.values())) == 2
    # the batch that lost the race rebuilt its segment: its first object is an orphan for compaction
    assert len(list(stack.store.list(f"indexes/{DATASET}/segments/"))) == 3


def test_handler_wired_from_the_environment(ingest_stack, preprocess, seed_eval_photos, tiny_model_dir,
                                            aws_endpoint_url, tmp_path, monkeypatch) -> None:
    """The Lambda entry point as deployed: Settings from env, model fetched from models/<model-id>/."""
    from clipsearch import wiring

    stack = ingest_stack
    for path in sorted(tiny_model_dir.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            key = f"models/{stack.model_id}/{path.relative_to(tiny_model_dir).as_posix()}"
            stack.s3.upload_file(str(path), stack.bucket, key)
    stack.upload(f"datasets/{DATASET}/a.jpg", photo(seed_eval_photos, 0))
    event = stack.drain()  # model uploads are in it too, and ignored
    for name, value in {
        "CLIPSEARCH_BUCKET": stack.bucket,
        "CLIPSEARCH_MODEL_ID": stack.model_id,
        "CLIPSEARCH_DATABASE_URL": stack.database_url,
        "CLIPSEARCH_S3_ENDPOINT_URL": aws_endpoint_url,
        "CLIPSEARCH_MODEL_CACHE_DIR": str(tmp_path / "models"),
    }.items():
        monkeypatch.setenv(name, value)
    clear = [factory for factory in vars(wiring).values() if hasattr(factory, "cache_clear")]
    for factory in clear:
        factory.cache_clear()
    try:
        assert preprocess.handler(event, CONTEXT) == {"batchItemFailures": []}
    finally:
        wiring.get_database().close()
        for factory in clear:
            factory.cache_clear()
    (row,) = stack.rows(DATASET)
    assert row["status"] == "indexed"
    assert stack.live_vectors(DATASET) == {row["id"]: 1}


def test_a_dataset_pinned_to_another_model_records_failures(ingest_stack, preprocess, seed_eval_photos) -> None:
    stack = ingest_stack
    stack.catalog.ensure_dataset(DATASET, "some-other-model")
    stack.upload(f"datasets/{DATASET}/a.jpg", photo(seed_eval_photos, 0))
    event = stack.drain()
    for _ in range(2):
        assert preprocess.handle(event, CONTEXT, stack.service()) == {"batchItemFailures": []}
    (row,) = stack.rows(DATASET)
    assert row["status"] == "failed" and "some-other-model" in row["failure_reason"]
    assert row["attempts"] == 1
    assert stack.catalog.live_segments(stack.catalog.get_dataset(DATASET).id) == []
