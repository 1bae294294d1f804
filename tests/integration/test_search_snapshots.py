"""A warm search snapshot stays consistent when ingestion or compaction commits while it is being read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from clipsearch import wiring
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.adapters.postgres_catalog import PostgresCatalog
from clipsearch.adapters.postgres_connection import Database
from clipsearch.compaction import CompactionPolicy, CompactionService
from clipsearch.ports import SegmentRef
from clipsearch.search import SearchService
from search_stack import MODEL_ID, SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration


class CommitAfterSegmentsRead(PostgresCatalog):
    """The real catalog, with a concurrent commit landing right after the first read of live segments:
    the moment a search's refresh is between its two reads."""

    def __init__(self, database: Database, commit: Callable[[], object]) -> None:
        super().__init__(database)
        self._commit = commit
        self.segment_reads = 0

    def live_segments(self, dataset_id: int) -> Sequence[SegmentRef]:
        refs = super().live_segments(dataset_id)
        self.segment_reads += 1
        if self.segment_reads == 1:
            self._commit()
        return refs


def search_service(stack: SearchStack, catalog: PostgresCatalog) -> SearchService:
    return SearchService(
        catalog=catalog, store=stack.store, model_id=MODEL_ID,
        text_encoder=lambda: pytest.fail("no text query here"), image_encoder=lambda: stack.encoder,
        max_image_bytes=6 * 1024 * 1024, vector_index=FaissVectorIndex(), segment_dir=stack.model_cache_dir.parent / "segments",
    )


def test_a_compaction_between_the_reads_never_brings_deleted_images_back(
    stack: SearchStack, seed_eval_photos: list[Path]
) -> None:
    photos = seed_eval_photos[:8]
    stack.index("photos", photos[:4])
    stack.index("photos", photos[4:])
    removed = photos[1]
    assert stack.catalog.remove_images("photos", f"datasets/photos/{removed.name}", None) == 1
    # The merge drops the deleted vector and retires both segments: their deleted ids leave
    # `deleted_image_ids`, while the old segments stay in the bucket for the grace period.
    compaction = CompactionService(stack.store, stack.catalog, CompactionPolicy(), FaissVectorIndex())
    catalog = CommitAfterSegmentsRead(
        wiring.get_database(), lambda: compaction.compact_dataset("photos", force=True)
    )

    result = search_service(stack, catalog).search_image("photos", removed.read_bytes(), removed.name, k=10)

    keys = [hit.key for hit in result.hits]
    assert f"datasets/photos/{removed.name}" not in keys
    assert sorted(keys) == sorted(f"datasets/photos/{photo.name}" for photo in photos if photo != removed)
    assert catalog.segment_reads == 2  # the first read was seen to be stale and read again
