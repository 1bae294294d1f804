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
from clipsearch.adapters.s3_store import S3ObjectStore
from clipsearch.errors import TransientError
from clipsearch.events import parse_message
from clipsearch.ingest import IngestService
from clipsearch.adapters.faiss_index import FaissVectorIndex
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
    index = FaissVectorIndex().load(stack.store.get(segment.object_key).data)
    query = stack.encoder.embed_image(photo(seed_eval_photos, 0), "query").vector
    scores, ids = index.search(query[np.newaxis, :], 2)
    assert ids[0] == cat["id"] and scores[0] == pytest.approx(1.0, abs=1e-4)


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


def test_a_malformed_message_fails_alone(ingest_stack, preprocess, seed_eval_photos) -> None:
    stack = ingest_stack
    stack.upload(f"datasets/{DATASET}/a.jpg", photo(seed_eval_photos, 0))
    event = stack.drain()
    bad = dict(event["Records"][0], messageId="bad-1", body='{"Records": [1, {"s3": []}]}')
    response = preprocess.handle({"Records": [*event["Records"], bad]}, CONTEXT, stack.service())
    assert failed_ids(response) == ["bad-1"]  # retried, then left in the dead-letter queue
    assert [row["status"] for row in stack.rows(DATASET)] == ["indexed"]


class RecordingStore(S3ObjectStore):
    """Notes every key it GETs."""

    def __init__(self, client, bucket: str) -> None:
        super().__init__(client, bucket)
        self.fetched: list[str] = []

    def get(self, key: str):
        self.fetched.append(key)
        return super().get(key)


def test_an_object_over_the_byte_limit_fails_without_being_fetched(ingest_stack, preprocess,
                                                                   seed_eval_photos) -> None:
    stack = ingest_stack
    small = photo(seed_eval_photos, 0)
    stack.upload(f"datasets/{DATASET}/small.jpg", small)
    stack.upload(f"datasets/{DATASET}/huge.jpg", photo(seed_eval_photos, 1) + b"\0" * len(small))
    event = stack.drain()
    store = RecordingStore(stack.s3, stack.bucket)
    service = IngestService(store, stack.catalog, stack.encoder, stack.model_id, FaissVectorIndex(), max_image_bytes=len(small))

    for _ in range(2):  # a failure is final: the redelivery claims nothing
        assert preprocess.handle(event, CONTEXT, service) == {"batchItemFailures": []}

    assert set(store.fetched) == {f"datasets/{DATASET}/small.jpg"}
    rows = {row["object_key"].rsplit("/", 1)[1]: row for row in stack.rows(DATASET)}
    assert rows["small.jpg"]["status"] == "indexed"
    huge = rows["huge.jpg"]
    assert huge["status"] == "failed" and huge["sha256"] is None and huge["attempts"] == 1
    assert huge["byte_size"] > len(small) and f"limit of {len(small)} bytes" in huge["failure_reason"]


def test_a_claim_left_by_a_crash_is_settled_when_its_key_moves_on(ingest_stack, preprocess,
                                                                 seed_eval_photos) -> None:
    stack = ingest_stack
    stack.upload(f"datasets/{DATASET}/a.jpg", photo(seed_eval_photos, 0))
    first = stack.drain()
    response = preprocess.handle(first, CONTEXT, stack.service(CrashingCommit(stack.database)))
    assert failed_ids(response)  # claimed at e1, died before its commit
    stack.upload(f"datasets/{DATASET}/a.jpg", photo(seed_eval_photos, 1))
    assert preprocess.handle(stack.drain(), CONTEXT, stack.service()) == {"batchItemFailures": []}
    # the retry fetches the new version, already live
    assert preprocess.handle(records_of(first, failed_ids(response)), CONTEXT, stack.service()) == {
        "batchItemFailures": []}
    assert [row["status"] for row in stack.rows(DATASET)] == ["deleted", "indexed"]
    assert stack.catalog.summarize_dataset(DATASET).counts["pending"] == 0


class DeletedBefore(PostgresCatalog):
    """Deletes the dataset just before the named step, as a user deleting it mid-batch would."""

    def __init__(self, database: Database, step: str) -> None:
        super().__init__(database)
        self._step = step

    def _delete(self, step: str, dataset_id: int) -> None:
        if step == self._step:
            self._step = ""
            (name,) = [s.dataset.name for s in self.list_datasets() if s.dataset.id == dataset_id]
            self.remove_dataset(name)

    def claim_images(self, dataset_id, images):
        self._delete("claim", dataset_id)
        return super().claim_images(dataset_id, images)

    def commit_batch(self, dataset_id, *args, **kwargs):
        self._delete("commit", dataset_id)
        return super().commit_batch(dataset_id, *args, **kwargs)


@pytest.mark.parametrize("step", ["claim", "commit"])
def test_a_dataset_deleted_mid_batch_settles_its_images(ingest_stack, preprocess, seed_eval_photos, step) -> None:
    stack = ingest_stack
    stack.catalog.ensure_dataset(DATASET, stack.model_id)
    stack.upload(f"datasets/{DATASET}/a.jpg", photo(seed_eval_photos, 0))
    stack.upload("datasets/other/b.jpg", photo(seed_eval_photos, 1))
    service = stack.service(DeletedBefore(stack.database, step))
    report = service.ingest([event for record in stack.drain()["Records"]
                             for event in parse_message(record["messageId"], record["body"])])
    assert (report.indexed, report.skipped, report.retry) == (1, 1, {})
    assert [row["status"] for row in stack.rows("other")] == ["indexed"]
    assert stack.rows(DATASET) == []
    assert list(stack.store.list(f"indexes/{DATASET}/")) == []  # no orphan left where nobody compacts


def test_a_batch_settled_entirely_by_another_commits_nothing(ingest_stack, preprocess, seed_eval_photos) -> None:
    stack = ingest_stack
    for position in range(2):
        stack.upload(f"datasets/{DATASET}/d{position}.jpg", photo(seed_eval_photos, position))
    event = stack.drain()
    barrier = threading.Barrier(2)
    databases = [Database(stack.database_url) for _ in range(2)]
    responses: list[dict] = []

    def run(database: Database) -> None:
        responses.append(preprocess.handle(event, CONTEXT, stack.service(MeetBeforeCommit(database, barrier))))

    threads = [threading.Thread(target=run, args=(database,)) for database in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for database in databases:
        database.close()
    assert responses == [{"batchItemFailures": []}] * 2
    assert stack.catalog.get_dataset(DATASET).index_version == 1  # the loser found nothing left to commit
    assert {row["status"] for row in stack.rows(DATASET)} == {"indexed"}
