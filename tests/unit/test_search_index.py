"""DatasetIndex: merging segments, filtering deleted ids, deduplicating ids, k above the dataset size."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest
from clipsearch.ports import Dataset, SegmentRef
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.lazy import Lazy
from clipsearch.search import DatasetIndex, LoadedSegment
from clipsearch.segments import FLAT, HNSW, IVF_SQ8, IndexSpec, SegmentVectors, ivf_spec

pytestmark = pytest.mark.unit

DIM = 32
NOW = datetime(2026, 1, 1, tzinfo=UTC)
DATASET = Dataset(id=1, name="photos", model_id="m", index_version=3, created_at=NOW, updated_at=NOW)
INDEX = FaissVectorIndex()


def clustered(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, 8, count)] + 0.3 * rng.standard_normal((count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def segment(name: str, ids: np.ndarray, vectors: np.ndarray, index_type: str = FLAT) -> LoadedSegment:
    spec = ivf_spec(len(ids)) if index_type == IVF_SQ8 else IndexSpec(index_type)
    data = INDEX.build(SegmentVectors(ids.astype(np.int64), vectors), spec)
    return LoadedSegment(SegmentRef(name, f"indexes/photos/segments/{name}.faiss", len(ids), index_type),
                          INDEX.load(data))


def exact_top(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    order = np.argsort(-(vectors @ query[0]), kind="stable")
    return [int(ids[i]) for i in order[:k]]


def test_deleted_ids_are_filtered_and_k_live_results_remain() -> None:
    vectors = clustered(300, seed=1)
    ids = np.arange(1, 301)
    first, second = segment("a", ids[:150], vectors[:150]), segment("b", ids[150:], vectors[150:])
    query = vectors[10:11]
    nearest = exact_top(ids, vectors, query, 20)
    deleted = set(nearest[:8])  # the 8 best matches, the query's own image among them

    index = DatasetIndex.build(DATASET, [first, second], deleted, INDEX)
    hits = index.search(query, 10)

    live = [image_id for image_id in nearest if image_id not in deleted]
    assert [image_id for image_id, _ in hits] == live[:10]
    assert sum(index.deleted_per_segment) == 8


def test_an_id_in_two_segments_is_returned_once() -> None:
    vectors = clustered(100, seed=2)
    ids = np.arange(1, 101)
    # Image 5 sits in both segments, as it may right after a compaction wrote the merged copy.
    first = segment("a", ids[:50], vectors[:50])
    second = segment("b", np.concatenate([[5], ids[50:]]), np.concatenate([vectors[4:5], vectors[50:]]))

    hits = DatasetIndex.build(DATASET, [first, second], set(), INDEX).search(vectors[4:5], 10)

    returned = [image_id for image_id, _ in hits]
    assert returned[0] == 5 and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert len(returned) == len(set(returned)) == 10


def test_k_above_the_dataset_size_returns_every_live_vector() -> None:
    vectors = clustered(12, seed=3)
    ids = np.arange(1, 13)
    hits = DatasetIndex.build(DATASET, [segment("a", ids, vectors)], {3, 4}, INDEX).search(vectors[:1], 1000)
    assert sorted(image_id for image_id, _ in hits) == [i for i in range(1, 13) if i not in (3, 4)]
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True)


def test_hnsw_and_flat_segments_merge_like_exact_search() -> None:
    vectors = clustered(2000, seed=4)
    ids = np.arange(1, 2001)
    hnsw, flat = segment("big", ids[:1800], vectors[:1800], HNSW), segment("tail", ids[1800:], vectors[1800:])
    index = DatasetIndex.build(DATASET, [hnsw, flat], set(), INDEX)
    queries = clustered(20, seed=5)
    recall = np.mean([
        len({image_id for image_id, _ in index.search(query[None], 10)} & set(exact_top(ids, vectors, query[None], 10))) / 10
        for query in queries
    ])
    assert recall >= 0.95


@pytest.mark.parametrize("index_type", [HNSW, IVF_SQ8])
def test_deleted_ids_are_excluded_inside_an_approximate_segment_at_its_search_depth(index_type: str) -> None:
    vectors = clustered(2000, seed=7)
    ids = np.arange(1, 2001)
    queries = clustered(20, seed=8)
    # Deleted: the 30 best matches of every query, far more than k.
    deleted = {image_id for query in queries for image_id in exact_top(ids, vectors, query[None], 30)}
    live = np.array([image_id not in deleted for image_id in ids])
    index = DatasetIndex.build(DATASET, [segment("big", ids, vectors, index_type)], deleted, INDEX)

    results = [[image_id for image_id, _ in index.search(query[None], 10)] for query in queries]

    assert all(len(found) == 10 and not set(found) & deleted for found in results)
    recall = np.mean([
        len(set(found) & set(exact_top(ids[live], vectors[live], query[None], 10))) / 10
        for found, query in zip(results, queries)
    ])
    # IVF probes a fixed set of lists: with each query's 30 best excluded, some of the next-best live in
    # lists it does not probe (a dataset that far behind on compaction is the exception).
    assert recall >= (0.95 if index_type == HNSW else 0.85)


def test_an_empty_dataset_finds_nothing() -> None:
    assert DatasetIndex.build(DATASET, [], set(), INDEX).search(clustered(1, seed=6), 5) == []


def test_is_current_follows_the_dataset_id_and_newer_versions() -> None:
    index = DatasetIndex.build(DATASET, [], set(), INDEX)
    assert index.is_current(DATASET)
    assert index.is_current(Dataset(1, "photos", "m", 2, NOW, NOW))  # a request that read an older row
    assert not index.is_current(Dataset(1, "photos", "m", 4, NOW, NOW))
    assert not index.is_current(Dataset(2, "photos", "m", 3, NOW, NOW))  # deleted and re-created


def test_lazy_builds_once_under_concurrent_first_use() -> None:
    builds: list[int] = []
    start = threading.Barrier(8)

    def build() -> object:
        builds.append(1)
        time.sleep(0.05)  # long enough for the other threads to arrive while the first one builds
        return object()

    lazy = Lazy(build)
    values: list[object] = []

    def use() -> None:
        start.wait()
        values.append(lazy.get())

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len({id(value) for value in values}) == 1


def test_segments_searched_on_the_callers_thread_and_one_pool_thread_rank_as_one_after_another(monkeypatch) -> None:
    """With a pool (segments over PARALLEL_SEARCH_MIN_BYTES, lowered here), the caller and one pool thread share
    the segments: the same hits and scores as searching them in turn, and one task handed to the pool."""
    from concurrent.futures import ThreadPoolExecutor

    import clipsearch.search as search_module

    vectors = clustered(1000, seed=5)
    ids = np.arange(1, 1001)
    segments = [segment(f"s{number}", ids[start:start + 200], vectors[start:start + 200])
                for number, start in enumerate(range(0, 1000, 200))]
    deleted = {int(ids[3]), int(ids[450]), int(ids[999])}
    index = DatasetIndex.build(DATASET, segments, deleted, INDEX)
    queries = vectors[[3, 77, 450, 901]]

    class CountingPool(ThreadPoolExecutor):
        tasks = 0

        def submit(self, *args, **kwargs):
            CountingPool.tasks += 1
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(search_module, "PARALLEL_SEARCH_MIN_BYTES", 0)
    with CountingPool(max_workers=2) as pool:
        shared = [index.search(query[None], 10, pool=pool) for query in queries]
    in_turn = [index.search(query[None], 10) for query in queries]

    assert shared == in_turn and CountingPool.tasks == len(queries)
    assert all(image_id not in deleted for hits in shared for image_id, _ in hits)


def test_a_segment_failing_on_the_callers_thread_raises_after_the_pool_thread_has_stopped(monkeypatch) -> None:
    """The caller's error is raised only once the pool thread's current segment is done, and the pool thread
    takes no segment after it: no FAISS search outlives the failed query."""
    import dataclasses
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import clipsearch.search as search_module

    vectors = clustered(1000, seed=6)
    ids = np.arange(1, 1001)
    caller = threading.current_thread()
    running: list[int] = []
    searched_after_failure: list[int] = []
    failed = threading.Event()

    class FailingOnTheCaller:
        def __init__(self, inner) -> None:
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def search(self, *args, **kwargs):
            if threading.current_thread() is caller:
                failed.set()
                raise RuntimeError("segment unreadable")
            if failed.is_set():
                searched_after_failure.append(1)
            running.append(1)
            time.sleep(0.02)
            running.pop()
            return self._inner.search(*args, **kwargs)

    segments = [segment(f"s{number}", ids[start:start + 100], vectors[start:start + 100])
                for number, start in enumerate(range(0, 1000, 100))]
    index = DatasetIndex.build(DATASET, segments, set(), INDEX)
    index = dataclasses.replace(index, segments=tuple(
        dataclasses.replace(loaded, segment=FailingOnTheCaller(loaded.segment)) for loaded in index.segments))
    monkeypatch.setattr(search_module, "PARALLEL_SEARCH_MIN_BYTES", 0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        with pytest.raises(RuntimeError, match="segment unreadable"):
            index.search(vectors[:1], 10, pool=pool)
        assert running == []
    assert len(searched_after_failure) <= 1  # at most the one it had already taken when the caller failed
