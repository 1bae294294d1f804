"""FaissVectorIndex: segments round-trip their ids, memory-mapped files search like loaded bytes, IVF-SQ8 recall."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.fakes import InMemoryVectorIndex
from clipsearch.ports import VectorIndex
from clipsearch.segments import FLAT, HNSW, HNSW_EF_SEARCH, IndexSpec, SegmentVectors, ivf_spec

pytestmark = pytest.mark.unit

INDEX: VectorIndex = FaissVectorIndex()


def clustered(rng: np.random.Generator, n: int, clusters: int, dim: int, spread: float) -> np.ndarray:
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    members = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return members / np.linalg.norm(members, axis=1, keepdims=True)


def test_flat_segment_round_trip_keeps_image_ids_and_vectors() -> None:
    rng = np.random.default_rng(0)
    content = SegmentVectors(np.array([7, 42, 1_000_003], np.int64), clustered(rng, 3, 3, 16, 0.1))
    data = INDEX.build(content, IndexSpec(FLAT))
    scores, ids = INDEX.load(data).search(content.vectors[1:2], 3)
    assert ids[0] == 42 and scores[0] == pytest.approx(1.0, abs=1e-5)
    restored = INDEX.read_vectors(data)
    assert restored.ids.tolist() == [7, 42, 1_000_003]
    np.testing.assert_allclose(restored.vectors, content.vectors, atol=1e-7)


def test_hnsw_segment_round_trip_keeps_search_depth() -> None:
    rng = np.random.default_rng(1)
    content = SegmentVectors(np.arange(100, 300, dtype=np.int64), clustered(rng, 200, 4, 8, 0.3))
    data = INDEX.build(content, IndexSpec(HNSW))
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    assert faiss.downcast_index(index.index).hnsw.efSearch == HNSW_EF_SEARCH
    assert sorted(INDEX.read_vectors(data).ids.tolist()) == list(range(100, 300))


def test_a_memory_mapped_ivf_segment_answers_like_the_loaded_one_and_survives_its_file(tmp_path) -> None:
    rng = np.random.default_rng(2)
    content = SegmentVectors(np.arange(5_000, 9_000, dtype=np.int64), clustered(rng, 4_000, 40, 32, 0.25))
    spec = ivf_spec(4_000)
    path = tmp_path / "segment.faiss"
    size = INDEX.write(content, spec, path)
    mapped = INDEX.open(path)
    path.unlink()  # as the search service does once the file is mapped
    loaded = INDEX.load(INDEX.build(content, spec))
    queries = content.vectors[:50]
    for query in queries:
        assert mapped.search(query[None], 10)[1].tolist() == loaded.search(query[None], 10)[1].tolist()
    assert mapped.nbytes == size and len(mapped) == 4_000
    assert sorted(mapped.ids.tolist()) == content.ids.tolist()


@pytest.mark.parametrize("count", [12_000, 1_000, 100], ids=["12k", "1k", "100 (fewer lists than 2 x probes)"])
def test_an_ivf_segment_probes_the_lists_and_scores_of_faiss_own_search_with_and_without_exclusions(count) -> None:
    """The segment picks its lists from an 8-bit copy of the centroids; FAISS's own IVF search is the reference."""
    rng = np.random.default_rng(5)
    content = SegmentVectors(np.arange(20_000, 20_000 + count, dtype=np.int64), clustered(rng, count, 120, 64, 0.3))
    data = INDEX.build(content, ivf_spec(count))
    segment = INDEX.load(data)
    reference = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    probes = faiss.downcast_index(reference.index).nprobe
    excluded = INDEX.exclusion(content.ids[::3])
    for query in clustered(rng, 100, 120, 64, 0.35):
        for k in (10, count + 5):
            scores, ids = segment.search(query[None], k)
            reference_scores, reference_ids = reference.search(query[None], k)
            found = reference_ids[0] >= 0
            assert ids.tolist() == reference_ids[0][found].tolist()
            np.testing.assert_array_equal(scores, reference_scores[0][found])
        kept_scores, kept = segment.search(query[None], 10, excluded)
        with_selector = faiss.SearchParametersIVF(sel=excluded.selector, nprobe=probes)
        reference_scores, reference_ids = reference.search(query[None], 10, params=with_selector)
        assert kept.tolist() == reference_ids[0][reference_ids[0] >= 0].tolist()
        assert not set(kept.tolist()) & set(content.ids[::3].tolist())
        np.testing.assert_array_equal(kept_scores, reference_scores[0][: len(kept)])


def test_an_ivf_segment_refuses_a_query_of_another_dimension_and_finds_nothing_for_nans() -> None:
    rng = np.random.default_rng(6)
    content = SegmentVectors(np.arange(2_000, dtype=np.int64), clustered(rng, 2_000, 20, 32, 0.3))
    data = INDEX.build(content, ivf_spec(2_000))
    whole = INDEX.load(data)
    partial = INDEX.open_partial(lambda start, end: data[start:end], len(data))
    for segment in (whole, partial):
        with pytest.raises(ValueError, match="a query of 16 values for a segment of 32-d vectors"):
            segment.search(np.ones((1, 16), np.float32), 10)
        scores, ids = segment.search(np.full((1, 32), np.nan, np.float32), 10)
        assert len(ids) == 0 and len(scores) == 0


def test_ivf_sq8_recall_at_10_on_clustered_vectors_and_exclusions() -> None:
    rng = np.random.default_rng(3)
    vectors = clustered(rng, 5_000, 100, 64, spread=0.05)
    queries = vectors[rng.integers(0, 5_000, 100)] + 0.02 * rng.standard_normal((100, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    segment = INDEX.load(INDEX.build(SegmentVectors(np.arange(5_000, dtype=np.int64), vectors), ivf_spec(5_000)))
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = [segment.search(query[None], 10)[1] for query in queries]
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
    assert recall >= 0.95
    excluded_ids = set(truth[:, :3].reshape(-1).tolist())
    excluded = INDEX.exclusion(np.array(sorted(excluded_ids)))
    for query in queries:
        ids = segment.search(query[None], 10, excluded)[1]
        assert len(ids) == 10 and not set(ids.tolist()) & excluded_ids


@pytest.mark.parametrize("index", [FaissVectorIndex(), InMemoryVectorIndex()], ids=["faiss", "in-memory fake"])
def test_selections_range_search_and_vectors_agree_between_faiss_and_the_fake(index: VectorIndex) -> None:
    rng = np.random.default_rng(4)
    ids = np.arange(10, 210, dtype=np.int64)
    vectors = clustered(rng, 200, 5, 16, 0.2)
    segment = index.load(index.build(SegmentVectors(ids, vectors), IndexSpec(FLAT)))
    np.testing.assert_allclose(segment.vectors(), vectors, atol=1e-6)
    only = index.selection(np.array([12, 50, 99], np.int64))
    assert sorted(segment.search(vectors[:1], 10, only)[1].tolist()) == [12, 50, 99]
    limits, scores, found = segment.range_search(vectors[:3], 0.9)
    for row in range(3):
        expected = ids[vectors @ vectors[row] >= 0.9]
        assert sorted(found[limits[row]:limits[row + 1]].tolist()) == sorted(expected.tolist())
        assert (scores[limits[row]:limits[row + 1]] >= 0.9 - 1e-6).all()
    limits, _, found = segment.range_search(vectors[:1], -1.0, index.exclusion(ids[1:]))
    assert found[limits[0]:limits[1]].tolist() == [10]
