"""FAISS segments: build from (image id, vector) pairs, serialize, load, name, and choose the index type."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import faiss
import numpy as np

FLAT = "flat"
HNSW = "hnsw"

# Exact search while it fits the query budget: a warm text query must answer in <= 15 ms, the int8
# text tower takes ~6 ms, and a one-thread flat scan of 512-d vectors costs ~0.12 ms per 1k vectors here
# (11.6 ms at 100k, benchmarks/search.py), so flat stays exact up to 50k. Beyond, HNSW answers in a few
# ms. Measured on 20k 512-d vectors in 200 loose gaussian clusters (member-to-center cosine ~0.74): with
# M=32 and efConstruction=80 (build 15 s), recall@10 is 0.80 at efSearch 128, 0.91 at 256 and 0.967 at
# 512 (3.7 ms per query), so the search depth is 512. Only compaction pays the build.
FLAT_LIMIT = 50_000
HNSW_NEIGHBORS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 512

# FAISS switches to its bundled BLAS for >= 20 queries at once, ~10x slower here (FACTS.md).
faiss.cvar.distance_compute_blas_threshold = 1_000_000


def new_segment_id() -> str:
    """Sortable by creation time, unique without coordination."""
    return f"{time.time_ns() // 1_000_000:013d}-{uuid.uuid4().hex[:12]}"


def choose_index_type(vector_count: int, flat_limit: int = FLAT_LIMIT) -> str:
    """The index type for a segment of `vector_count` vectors: exact up to `flat_limit`, HNSW beyond."""
    return FLAT if vector_count <= flat_limit else HNSW


@dataclass(frozen=True)
class SegmentVectors:
    """The content of a segment: image ids and their L2-normalized float32 vectors, row for row."""

    ids: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, dim]

    def __post_init__(self) -> None:
        if self.ids.ndim != 1 or self.vectors.ndim != 2 or len(self.ids) != len(self.vectors):
            raise ValueError(f"ids {self.ids.shape} do not match vectors {self.vectors.shape}")

    def keep(self, mask: np.ndarray) -> SegmentVectors:
        return SegmentVectors(self.ids[mask], self.vectors[mask])

    @staticmethod
    def concatenate(parts: list[SegmentVectors], dim: int) -> SegmentVectors:
        if not parts:
            return SegmentVectors(np.empty(0, np.int64), np.empty((0, dim), np.float32))
        return SegmentVectors(
            np.concatenate([part.ids for part in parts]),
            np.concatenate([part.vectors for part in parts]),
        )


def build_index(content: SegmentVectors, index_type: str = FLAT) -> faiss.Index:
    """An IndexIDMap2 (ids = image ids, inner product = cosine on normalized vectors)."""
    dim = content.vectors.shape[1]
    if index_type == FLAT:
        inner = faiss.IndexFlatIP(dim)
    elif index_type == HNSW:
        inner = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBORS, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        raise ValueError(f"unknown index type {index_type!r}")
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(
        np.ascontiguousarray(content.vectors, dtype=np.float32),
        np.ascontiguousarray(content.ids, dtype=np.int64),
    )
    return index


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def build_segment(content: SegmentVectors, index_type: str = FLAT) -> bytes:
    return serialize(build_index(content, index_type))


def load_segment(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def segment_vectors(index: faiss.Index) -> SegmentVectors:
    """The ids and vectors a loaded segment holds (for merging)."""
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    vectors = index.index.reconstruct_n(0, index.ntotal) if index.ntotal else np.empty(
        (0, index.d), np.float32
    )
    return SegmentVectors(ids, np.asarray(vectors, dtype=np.float32))
