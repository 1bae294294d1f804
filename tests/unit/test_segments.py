"""FAISS segments: ids survive serialization, merging reads vectors back, and HNSW recall on clusters."""

from __future__ import annotations

import time

import faiss
import numpy as np
import pytest
from clipsearch.segments import (
    FLAT,
    FLAT_LIMIT,
    HNSW,
    HNSW_EF_SEARCH,
    SegmentVectors,
    build_index,
    build_segment,
    choose_index_type,
    load_segment,
    new_segment_id,
    segment_vectors,
)

pytestmark = pytest.mark.unit


def normalized(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, clusters: int, dim: int, spread: float) -> np.ndarray:
    centers = normalized(rng, clusters, dim)
    members = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return members / np.linalg.norm(members, axis=1, keepdims=True)


def test_choose_index_type_by_size() -> None:
    assert choose_index_type(0) == FLAT
    assert choose_index_type(FLAT_LIMIT) == FLAT
    assert choose_index_type(FLAT_LIMIT + 1) == HNSW
    assert choose_index_type(500, flat_limit=100) == HNSW


def test_flat_segment_round_trip_keeps_image_ids_and_vectors() -> None:
    rng = np.random.default_rng(0)
    content = SegmentVectors(np.array([7, 42, 1_000_003], np.int64), normalized(rng, 3, 16))
    index = load_segment(build_segment(content))
    scores, ids = index.search(content.vectors[1:2], 3)
    assert ids[0, 0] == 42 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    restored = segment_vectors(index)
    assert restored.ids.tolist() == [7, 42, 1_000_003]
    np.testing.assert_allclose(restored.vectors, content.vectors, atol=1e-7)


def test_hnsw_segment_round_trip_keeps_search_depth() -> None:
    rng = np.random.default_rng(1)
    content = SegmentVectors(np.arange(100, 300, dtype=np.int64), normalized(rng, 200, 8))
    index = load_segment(build_segment(content, HNSW))
    assert faiss.downcast_index(index.index).hnsw.efSearch == HNSW_EF_SEARCH
    assert sorted(segment_vectors(index).ids.tolist()) == list(range(100, 300))


def test_hnsw_recall_at_10_on_clustered_vectors() -> None:
    rng = np.random.default_rng(2)
    data = clustered(rng, 20_000, 200, 512, spread=0.04)
    queries = clustered(rng, 200, 200, 512, spread=0.04)
    content = SegmentVectors(np.arange(20_000, dtype=np.int64), data)
    exact = build_index(content, FLAT)
    started = time.perf_counter()
    approximate = load_segment(build_segment(content, HNSW))
    build_seconds = time.perf_counter() - started
    _, truth = exact.search(queries, 10)
    _, found = approximate.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
    print(f"HNSW recall@10 {recall:.4f} over 20k clustered vectors, build+serialize {build_seconds:.1f} s")
    assert recall >= 0.95


def test_segment_ids_sort_by_creation_and_never_repeat() -> None:
    ids = [new_segment_id() for _ in range(200)]
    assert len(set(ids)) == 200
    assert ids[0][:13] <= ids[-1][:13] and ids[0][:13].isdigit()
    time.sleep(0.002)
    assert new_segment_id() > ids[-1]
