"""Kept filter selections through the search function: a deleted image never comes back, an ingested one is
found at once; and the catalog's key-range prefix holds at the edges of Unicode."""

from __future__ import annotations

from pathlib import Path

import pytest
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
from clipsearch.adapters.postgres_connection import Database
from clipsearch.datasets import image_key, segment_key
from clipsearch.events import EventKind, ObjectEvent
from clipsearch.ingest import IngestService
from clipsearch.ports import IndexedImage, NewImage, NewSegment
from search_stack import MODEL_ID, SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration

DATASET = "albums"
QUERY = {"query": "a red car", "prefix": "trips/"}


def ingest(stack: SearchStack, events: list[ObjectEvent]) -> None:
    report = IngestService(stack.store, stack.catalog, stack.encoder, MODEL_ID, FaissVectorIndex()).ingest(events)
    assert not report.retry and not report.failed, report


def upload(stack: SearchStack, relative: str, photo: Path) -> ObjectEvent:
    key = image_key(DATASET, relative)
    etag = stack.store.put(key, photo.read_bytes(), content_type="image/jpeg")
    return ObjectEvent(f"upload-{key}", EventKind.CREATED, stack.store.bucket, key, DATASET, etag)


def found(stack: SearchStack, k: int) -> list[str]:
    status, body = stack.call(stack.search, "search_text", dataset=DATASET, body={**QUERY, "k": k})
    assert status == 200, body
    return [hit["key"].removeprefix(f"datasets/{DATASET}/") for hit in body["results"]]


def test_a_folder_searched_again_sees_deletions_and_new_images(stack: SearchStack, seed_eval_photos: list[Path]) -> None:
    trips = [f"trips/{photo.name}" for photo in seed_eval_photos[:4]]
    ingest(stack, [upload(stack, relative, photo) for relative, photo in zip(trips, seed_eval_photos)]
           + [upload(stack, f"home/{photo.name}", photo) for photo in seed_eval_photos[4:8]])
    ranking = found(stack, k=4)
    assert sorted(ranking) == sorted(trips)
    assert found(stack, k=2) == ranking[:2]  # the folder's selection, kept for this version

    removed = image_key(DATASET, ranking[0])
    stack.store.delete_many([removed])
    ingest(stack, [ObjectEvent("removal", EventKind.REMOVED, stack.store.bucket, removed, DATASET, None)])

    # A selection kept from before the deletion would admit the best hit, which the page then drops: one short.
    assert found(stack, k=2) == ranking[1:3]

    added = f"trips/again-{seed_eval_photos[8].name}"
    ingest(stack, [upload(stack, added, seed_eval_photos[8])])
    assert sorted(found(stack, k=10)) == sorted(ranking[1:] + [added])


@pytest.fixture
def catalog(database_url: str):
    database = Database(database_url)
    migrate(database)
    yield PostgresCatalog(database)
    database.close()


def test_a_prefix_is_a_key_range_that_holds_at_the_edges_of_unicode(catalog: PostgresCatalog) -> None:
    """The prefix is read as the range [prefix, its last character + 1): a last character of U+10FFFF has no
    successor, and the one after U+D7FF is U+E000 (surrogates are no characters)."""
    dataset = "unicode"
    row = catalog.ensure_dataset(dataset, MODEL_ID)
    relatives = ["a\U0010ffff/1.jpg", "a\U0010ffff\U0010ffff/2.jpg", "b/3.jpg", "\ud7ff/4.jpg", "\ue000/5.jpg",
                 "é/6.jpg", "éa/7.jpg", "ê/8.jpg", "\U0010ffff/9.jpg"]
    claims = catalog.claim_images(row.id, [
        NewImage("bucket", image_key(dataset, relative), "etag", None, "0" * 64, 1) for relative in relatives
    ])
    id_of = {claim.key.removeprefix(f"datasets/{dataset}/"): claim.id for claim in claims}
    segment = NewSegment("u", segment_key(dataset, "u"), len(claims), "flat")
    catalog.commit_batch(row.id, segment, [IndexedImage(claim.id, 1, 1) for claim in claims], [])

    def matching(prefix: str) -> set[str]:
        ids = catalog.filtered_image_ids(row.id, f"datasets/{dataset}/{prefix}", None, None)
        assert ids.dtype.name == "int64"
        return {relative for relative, image_id in id_of.items() if image_id in set(ids.tolist())}

    assert matching("a\U0010ffff") == {"a\U0010ffff/1.jpg", "a\U0010ffff\U0010ffff/2.jpg"}
    assert matching("a\U0010ffff\U0010ffff") == {"a\U0010ffff\U0010ffff/2.jpg"}
    assert matching("\U0010ffff") == {"\U0010ffff/9.jpg"}
    assert matching("\ud7ff") == {"\ud7ff/4.jpg"}
    assert matching("é") == {"é/6.jpg", "éa/7.jpg"}
    assert matching("") == set(relatives)
