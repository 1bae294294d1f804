"""Kept filter selections through the search function: a deleted image never comes back, an ingested one is
found at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.datasets import image_key
from clipsearch.events import EventKind, ObjectEvent
from clipsearch.ingest import IngestService
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
