"""Compaction keeps exactly the live set, caps its segments, picks the index type by size, and removes released
objects (real PostgreSQL, S3 endpoint and FAISS)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from clipsearch.compaction import CompactionPolicy, CompactionService
from clipsearch.errors import MaintenanceFailed
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.search import DatasetIndex, LoadedSegment
from clipsearch.segments import FLAT, IVF_SQ8
from http_events import load_function
from ingest_stack import CONTEXT, ingest_stack, preprocess_function
from test_ingest import CrashingCommit

__all__ = ["ingest_stack"]

DATASET = "testDataset"


def ingest(stack, preprocess, service=None) -> dict:
    return preprocess.handle(stack.drain(), CONTEXT, service or stack.service())


@pytest.fixture
def churned(ingest_stack, seed_eval_photos):
    """Four batches (one crashed and retried), one deletion, one replacement: 7 live images."""
    stack, preprocess = ingest_stack, preprocess_function()
    photos = [path.read_bytes() for path in seed_eval_photos[:9]]
    for batch in range(3):
        for position in range(2):
            stack.upload(f"datasets/{DATASET}/b{batch}-{position}.jpg", photos[2 * batch + position])
        ingest(stack, preprocess)
    stack.s3.delete_object(Bucket=stack.bucket, Key=f"datasets/{DATASET}/b0-0.jpg")
    stack.upload(f"datasets/{DATASET}/b1-1.jpg", photos[6])
    ingest(stack, preprocess)
    stack.upload(f"datasets/{DATASET}/late-0.jpg", photos[7])
    stack.upload(f"datasets/{DATASET}/late-1.jpg", photos[8])
    event = stack.drain()
    crashing = stack.service(CrashingCommit(stack.database))
    response = preprocess.handle(event, CONTEXT, crashing)  # leaves an orphan segment object
    assert preprocess.handle(event, CONTEXT, crashing) == {"batchItemFailures": []} != response
    return stack


def live_rows(stack) -> dict[int, dict]:
    return {row["id"]: row for row in stack.rows(DATASET) if row["status"] == "indexed"}


@pytest.mark.unit
def test_policy_thresholds() -> None:
    policy = CompactionPolicy(max_segments=4, deleted_fraction=0.25)
    assert not policy.needs_compaction(4, 100, 25)
    assert policy.needs_compaction(5, 100, 0)
    assert policy.needs_compaction(2, 100, 26)
    assert not policy.needs_compaction(0, 0, 0)


@pytest.mark.integration
def test_compaction_keeps_exactly_the_live_set(churned) -> None:
    stack = churned
    dataset = stack.catalog.get_dataset(DATASET)
    before = list(stack.catalog.live_segments(dataset.id))
    live = live_rows(stack)
    assert len(live) == 7 and len(before) == 5
    old_vectors = {}
    for segment in before:
        content = FaissVectorIndex().read_vectors(stack.store.get(segment.object_key).data)
        old_vectors.update({int(i): v for i, v in zip(content.ids, content.vectors) if int(i) in live})

    relaxed = CompactionService(stack.store, stack.catalog, CompactionPolicy(max_segments=8, deleted_fraction=0.5), FaissVectorIndex())
    assert relaxed.compact_dataset(DATASET).merged_segments == 0  # 5 segments, 2 of 9 vectors dead

    service = CompactionService(stack.store, stack.catalog, CompactionPolicy(max_segments=4), FaissVectorIndex())
    report = service.compact_dataset(DATASET)

    assert (report.merged_segments, report.segments_written, report.vectors_kept, report.vectors_dropped) == (5, 1, 7, 2)
    assert report.index_types == (FLAT,) and report.index_version == dataset.index_version + 1
    (merged,) = stack.catalog.live_segments(dataset.id)
    assert stack.live_vectors(DATASET) == {image_id: 1 for image_id in live}
    content = FaissVectorIndex().read_vectors(stack.store.get(merged.object_key).data)
    for image_id, vector in zip(content.ids, content.vectors):
        np.testing.assert_array_equal(vector, old_vectors[int(image_id)])
    assert {row["segment_id"] for row in live_rows(stack).values()} == {merged.id}
    assert stack.catalog.deleted_image_ids(dataset.id) == set()
    # the grace period keeps the retired and orphan objects for searches still reading them
    assert report.objects_removed == 0
    assert len(list(stack.store.list(f"indexes/{DATASET}/segments/"))) == 7


def search_all(stack, queries: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
    """The search function's own merge over the dataset's live segments (deleted ids excluded)."""
    dataset = stack.catalog.get_dataset(DATASET)
    segments = [LoadedSegment(ref, FaissVectorIndex().load(stack.store.get(ref.object_key).data))
                for ref in stack.catalog.live_segments(dataset.id)]
    index = DatasetIndex.build(dataset, segments, stack.catalog.deleted_image_ids(dataset.id), FaissVectorIndex())
    return [index.search(query[None], k) for query in queries]


@pytest.mark.integration
def test_capped_compaction_rewrites_only_dirty_segments_and_search_is_unchanged(churned) -> None:
    stack = churned
    dataset = stack.catalog.get_dataset(DATASET)
    before = list(stack.catalog.live_segments(dataset.id))
    live = live_rows(stack)
    queries = np.concatenate([FaissVectorIndex().read_vectors(stack.store.get(s.object_key).data).vectors
                              for s in before])
    found_before = search_all(stack, queries)

    # a cap of 2 vectors: every 2-vector segment is full; the two that lost a vector are dirty
    service = CompactionService(stack.store, stack.catalog, CompactionPolicy(max_segment_vectors=2), FaissVectorIndex())
    report = service.compact_dataset(DATASET)

    after = list(stack.catalog.live_segments(dataset.id))
    dirty = [s.id for s in before if sum(1 for row in live.values() if row["segment_id"] == s.id) < s.vector_count]
    assert len(dirty) == 2 and (report.merged_segments, report.segments_written) == (2, 1)
    assert {s.id for s in before} - {s.id for s in after} == set(dirty)
    assert max(s.vector_count for s in after) <= 2 and sum(s.vector_count for s in after) == len(live)
    assert stack.live_vectors(DATASET) == {image_id: 1 for image_id in live}
    assert {row["segment_id"] for row in live_rows(stack).values()} == {s.id for s in after}
    found_after = search_all(stack, queries)
    assert [[image_id for image_id, _ in hits] for hits in found_after] == [
        [image_id for image_id, _ in hits] for hits in found_before]
    np.testing.assert_allclose([[score for _, score in hits] for hits in found_after],
                               [[score for _, score in hits] for hits in found_before], rtol=0, atol=1e-6)


@pytest.mark.integration
def test_released_objects_are_removed_after_the_grace_period(churned) -> None:
    stack = churned
    CompactionService(stack.store, stack.catalog, CompactionPolicy(max_segments=1), FaissVectorIndex()).compact_dataset(DATASET)
    immediate = CompactionService(stack.store, stack.catalog, CompactionPolicy(orphan_grace_seconds=-5), FaissVectorIndex())
    report = immediate.compact_dataset(DATASET)
    assert report.merged_segments == 0 and report.objects_removed == 6  # 5 retired + 1 orphan
    dataset = stack.catalog.get_dataset(DATASET)
    (merged,) = stack.catalog.live_segments(dataset.id)
    assert [item.key for item in stack.store.list(f"indexes/{DATASET}/segments/")] == [merged.object_key]
    assert stack.catalog.segment_keys(dataset.id) == {merged.object_key}


@pytest.mark.integration
def test_a_large_merge_becomes_ivf_sq8(churned) -> None:
    stack = churned
    service = CompactionService(stack.store, stack.catalog, CompactionPolicy(flat_limit=3), FaissVectorIndex())
    result = load_function("compact").handle({"dataset": DATASET, "force": True}, service)
    (report,) = result["datasets"]
    assert tuple(report["index_types"]) == (IVF_SQ8,) and report["vectors_kept"] == 7
    dataset = stack.catalog.get_dataset(DATASET)
    (merged,) = stack.catalog.live_segments(dataset.id)
    data = stack.store.get(merged.object_key).data
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    assert isinstance(faiss.downcast_index(index.index), faiss.IndexIVFScalarQuantizer)
    probe = FaissVectorIndex().read_vectors(data)
    segment = FaissVectorIndex().load(data)
    found = [segment.search(vector[None], 1)[1][0] for vector in probe.vectors]
    assert found == probe.ids.tolist()
    assert sorted(probe.ids.tolist()) == sorted(live_rows(stack))


@pytest.mark.integration
def test_one_failing_dataset_does_not_stop_the_others(churned, seed_eval_photos) -> None:
    stack = churned
    preprocess = preprocess_function()
    for batch in range(2):
        stack.upload(f"datasets/a_broken/x{batch}.jpg", seed_eval_photos[batch].read_bytes())
        ingest(stack, preprocess)
    broken = stack.catalog.get_dataset("a_broken")
    stack.store.delete_many([segment.object_key for segment in stack.catalog.live_segments(broken.id)])

    service = CompactionService(stack.store, stack.catalog, CompactionPolicy(max_segments=1), FaissVectorIndex())
    with pytest.raises(MaintenanceFailed, match="a_broken"):
        load_function("compact").handle({}, service)
    assert len(stack.catalog.live_segments(stack.catalog.get_dataset(DATASET).id)) == 1  # compacted anyway
    assert len(stack.catalog.live_segments(broken.id)) == 2
