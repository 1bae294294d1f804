"""Event faults end to end: duplicated and reordered S3 events, an object deleted mid-indexing, a key re-uploaded
while indexed. Real uploads notify a real queue, the preprocessing handler ingests, the search handler answers;
each case ends with 0 lost, 0 doubled and 0 stale, in the catalog and in search hits."""

from __future__ import annotations

from pathlib import Path

import pytest
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.ingest import IngestService
from ingest_stack import CONTEXT, IngestStack, ingest_stack, preprocess_function  # noqa: F401  (fixture)
from search_stack import SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration

DATASET = "faults"
SAME_CONTENT = 0.9999  # an image query scores its own content ~1.0 (float rounding); anything else lower


@pytest.fixture(scope="module")
def preprocess():
    return preprocess_function()


@pytest.fixture
def ingest(ingest_stack: IngestStack, stack: SearchStack) -> IngestStack:
    """The ingestion stack, its queue emptied of the search stack's model upload."""
    ingest_stack.drain()
    return ingest_stack


def key(name: str) -> str:
    return f"datasets/{DATASET}/{name}"


def single_records(event: dict) -> list[dict]:
    """Each record of a drained event as its own one-record batch, in the order the queue gave them."""
    return [{"Records": [record]} for record in event["Records"]]


def image_hits(stack: SearchStack, image: bytes) -> list[tuple[str, float]]:
    status, body = stack.call(stack.search, "search_image_raw", dataset=DATASET, body=image, query={"k": "50"})
    assert status == 200, body
    return [(hit["key"], hit["score"]) for hit in body["results"]]


def assert_exactly(ingest: IngestStack, search: SearchStack, live: dict[str, bytes], gone: list[bytes]) -> None:
    """`live` (key -> its current content) is all the dataset holds, once each, and only as that content:
    one indexed row per key at the bucket's current ETag, nothing pending, each vector in one live segment;
    an image query by each content finds its key first (score ~1) among exactly the live keys; no query by a
    `gone` content (deleted or replaced) scores ~1 against anything."""
    rows = ingest.rows(DATASET)
    indexed = {row["object_key"]: row for row in rows if row["status"] == "indexed"}
    assert sorted(row["object_key"] for row in rows if row["status"] == "indexed") == sorted(live)  # 0 lost/doubled
    assert [row["object_key"] for row in rows if row["status"] not in ("indexed", "deleted")] == []
    for name in live:
        assert indexed[name]["etag"] == ingest.s3.head_object(Bucket=ingest.bucket, Key=name)["ETag"].strip('"')
    deleted = ingest.catalog.deleted_image_ids(ingest.catalog.get_dataset(DATASET).id)
    searchable = {image_id: held for image_id, held in ingest.live_vectors(DATASET).items() if image_id not in deleted}
    assert searchable == {row["id"]: 1 for row in indexed.values()}

    for name, content in live.items():
        hits = image_hits(search, content)
        assert sorted(hit_key for hit_key, _ in hits) == sorted(live)  # every live key once, no other
        assert hits[0][0] == name and hits[0][1] > SAME_CONTENT
    for content in gone:
        assert all(score < SAME_CONTENT for _, score in image_hits(search, content))  # 0 stale


def test_the_same_event_delivered_twice_and_in_one_batch_twice_indexes_once(
    ingest: IngestStack, stack: SearchStack, preprocess, seed_eval_photos: list[Path]
) -> None:
    photos = {key(f"p{position}.jpg"): seed_eval_photos[position].read_bytes() for position in range(3)}
    for name, content in photos.items():
        ingest.upload(name, content)
    event = ingest.drain()
    doubled = {"Records": event["Records"] + event["Records"]}  # a redelivery inside the same batch

    for delivery in (doubled, event, single_records(event)[0]):
        assert preprocess.handle(delivery, CONTEXT, ingest.service()) == {"batchItemFailures": []}

    assert_exactly(ingest, stack, photos, gone=[])


def test_a_delete_event_before_its_create_leaves_nothing_of_that_object(
    ingest: IngestStack, stack: SearchStack, preprocess, seed_eval_photos: list[Path]
) -> None:
    kept, deleted = seed_eval_photos[0].read_bytes(), seed_eval_photos[1].read_bytes()
    ingest.upload(key("kept.jpg"), kept)
    ingest.upload(key("short-lived.jpg"), deleted)
    ingest.s3.delete_object(Bucket=ingest.bucket, Key=key("short-lived.jpg"))
    batches = single_records(ingest.drain())
    assert len(batches) == 3

    for batch in reversed(batches):  # the removal first, then the creates
        assert preprocess.handle(batch, CONTEXT, ingest.service()) == {"batchItemFailures": []}

    assert_exactly(ingest, stack, {key("kept.jpg"): kept}, gone=[deleted])


def test_a_late_removal_of_an_earlier_version_keeps_the_key_uploaded_again(
    ingest: IngestStack, stack: SearchStack, preprocess, seed_eval_photos: list[Path]
) -> None:
    first, second = seed_eval_photos[0].read_bytes(), seed_eval_photos[1].read_bytes()
    ingest.upload(key("a.jpg"), first)
    ingest.s3.delete_object(Bucket=ingest.bucket, Key=key("a.jpg"))
    ingest.upload(key("a.jpg"), second)
    batches = single_records(ingest.drain())
    assert len(batches) == 3  # created (first), removed, created (second)

    for batch in (batches[2], batches[0], batches[1]):  # the newest create, the oldest, then the removal
        assert preprocess.handle(batch, CONTEXT, ingest.service()) == {"batchItemFailures": []}

    assert_exactly(ingest, stack, {key("a.jpg"): second}, gone=[first])


class RunsWhileEmbedding:
    """The image encoder, running `meanwhile` once before its first embedding: a fault mid-indexing."""

    def __init__(self, encoder, meanwhile) -> None:
        self._encoder = encoder
        self._meanwhile = meanwhile

    def embed_images(self, items):
        if self._meanwhile is not None:
            meanwhile, self._meanwhile = self._meanwhile, None
            meanwhile()
        return self._encoder.embed_images(items)


def with_encoder(ingest: IngestStack, encoder) -> IngestService:
    return IngestService(ingest.store, ingest.catalog, encoder, ingest.model_id, FaissVectorIndex())


@pytest.mark.parametrize("removal", ["before the commit", "after the commit"])
def test_an_object_deleted_mid_indexing_is_not_searchable(
    ingest: IngestStack, stack: SearchStack, preprocess, seed_eval_photos: list[Path], removal: str
) -> None:
    kept, doomed = seed_eval_photos[0].read_bytes(), seed_eval_photos[1].read_bytes()
    ingest.upload(key("kept.jpg"), kept)
    ingest.upload(key("doomed.jpg"), doomed)
    creates = ingest.drain()
    removals: list[dict] = []

    def delete_the_object() -> None:  # fetched and claimed already; its removal may be handled at once
        ingest.s3.delete_object(Bucket=ingest.bucket, Key=key("doomed.jpg"))
        removals.append(ingest.drain())
        if removal == "before the commit":
            assert preprocess.handle(removals[0], CONTEXT, ingest.service()) == {"batchItemFailures": []}

    indexing = with_encoder(ingest, RunsWhileEmbedding(ingest.encoder, delete_the_object))
    assert preprocess.handle(creates, CONTEXT, indexing) == {"batchItemFailures": []}
    if removal == "after the commit":
        assert preprocess.handle(removals[0], CONTEXT, ingest.service()) == {"batchItemFailures": []}

    assert_exactly(ingest, stack, {key("kept.jpg"): kept}, gone=[doomed])


def test_a_key_uploaded_again_while_indexed_is_found_by_its_new_content_only(
    ingest: IngestStack, stack: SearchStack, preprocess, seed_eval_photos: list[Path]
) -> None:
    old, new, other = (seed_eval_photos[position].read_bytes() for position in range(3))
    ingest.upload(key("a.jpg"), old)
    ingest.upload(key("b.jpg"), other)
    assert preprocess.handle(ingest.drain(), CONTEXT, ingest.service()) == {"batchItemFailures": []}
    assert image_hits(stack, old)[0][0] == key("a.jpg")  # the search function now caches the old index

    ingest.upload(key("a.jpg"), new)
    assert preprocess.handle(ingest.drain(), CONTEXT, ingest.service()) == {"batchItemFailures": []}

    assert_exactly(ingest, stack, {key("a.jpg"): new, key("b.jpg"): other}, gone=[old])


def test_a_stale_version_finishing_after_the_new_one_does_not_replace_it(
    ingest: IngestStack, stack: SearchStack, preprocess, seed_eval_photos: list[Path]
) -> None:
    old, new = seed_eval_photos[0].read_bytes(), seed_eval_photos[1].read_bytes()
    ingest.upload(key("a.jpg"), old)
    first_upload = ingest.drain()

    def upload_and_index_the_new_version() -> None:  # the old version is fetched and claimed already
        ingest.upload(key("a.jpg"), new)
        assert preprocess.handle(ingest.drain(), CONTEXT, ingest.service()) == {"batchItemFailures": []}

    slow = with_encoder(ingest, RunsWhileEmbedding(ingest.encoder, upload_and_index_the_new_version))
    assert preprocess.handle(first_upload, CONTEXT, slow) == {"batchItemFailures": []}

    assert_exactly(ingest, stack, {key("a.jpg"): new}, gone=[old])
