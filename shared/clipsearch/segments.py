"""Segments without FAISS: their content, their ids, and the pure choice of index kind by size and memory.

The VectorIndex port (adapters/faiss_index.py) builds and loads them; measurements that chose the
numbers below are in docs/SEGMENT_FORMATS.md (benchmarks/search.py --formats).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np

FLAT = "flat"  # float32, exact
SQ8 = "sq8"  # 8-bit scalar quantizer, scanned whole
HNSW = "hnsw"  # float32 vectors in an HNSW graph (segments written before SEGMENT_FORMATS.md)
HNSW_SQ8 = "hnsw_sq8"  # 8-bit vectors in an HNSW graph
IVF_SQ8 = "ivf_sq8"  # 8-bit vectors in inverted lists around k-means centroids

# Exact search while it fits the query budget: a warm text query must answer in <= 15 ms, the int8
# text tower takes ~6-9 ms, and a one-thread flat scan of 512-d vectors costs ~0.12 ms per 1k vectors here
# (11.6 ms at 100k, benchmarks/search.py), so flat stays exact up to 50k.
FLAT_LIMIT = 50_000
HNSW_NEIGHBORS = 32
HNSW_EF_CONSTRUCTION = 80
# On 20k 512-d vectors in 200 loose gaussian clusters, recall@10 was 0.80 at efSearch 128, 0.91 at 256
# and 0.967 at 512 (3.7 ms per query).
HNSW_EF_SEARCH = 512
# Inverted lists: ~4 * sqrt(n) lists (FAISS's guideline), scanning PROBE_FRACTION of them.
IVF_MIN_LISTS = 256
IVF_MAX_LISTS = 8192
IVF_PROBE_FRACTION = 1 / 64
IVF_MIN_PROBES = 8

# Bytes a 512-d vector costs in memory, by kind, as measured (file size / n at 100k, id map included).
_CODE_BYTES = {FLAT: 4.0, SQ8: 1.0, HNSW: 4.0, HNSW_SQ8: 1.0, IVF_SQ8: 1.0}
_OVERHEAD_BYTES = {FLAT: 8, SQ8: 8, HNSW: 8 + 8 * HNSW_NEIGHBORS + 8, HNSW_SQ8: 8 + 8 * HNSW_NEIGHBORS + 8,
                   IVF_SQ8: 8 + 8}


@dataclass(frozen=True)
class IndexSpec:
    """How to build one segment: its kind and the search depth it keeps."""

    kind: str
    neighbors: int = HNSW_NEIGHBORS
    ef_construction: int = HNSW_EF_CONSTRUCTION
    ef_search: int = HNSW_EF_SEARCH
    lists: int = 0  # inverted lists (IVF kinds)
    probes: int = 0  # lists scanned per query (IVF kinds)


def bytes_per_vector(kind: str, dim: int = 512) -> float:
    """What one vector costs a loaded segment of `kind` (codes, id map, graph links or list ids)."""
    return _CODE_BYTES[kind] * dim + _OVERHEAD_BYTES[kind]


def ivf_spec(vector_count: int) -> IndexSpec:
    lists = int(min(IVF_MAX_LISTS, max(IVF_MIN_LISTS, 4 * np.sqrt(max(vector_count, 1)))))
    lists = min(lists, max(1, vector_count // 39))  # FAISS wants >= 39 training points per list
    probes = min(lists, max(IVF_MIN_PROBES, int(np.ceil(lists * IVF_PROBE_FRACTION))))
    return IndexSpec(IVF_SQ8, lists=lists, probes=probes)


def choose_index(
    vector_count: int, memory_budget_bytes: float = float("inf"), flat_limit: int = FLAT_LIMIT, dim: int = 512
) -> IndexSpec:
    """The index for a segment of `vector_count` vectors that must fit `memory_budget_bytes` once loaded.

    - up to `flat_limit`: flat, exact (a scan still fits the query budget);
    - beyond: IVF over 8-bit codes, the measured winner at 100k (recall@10 0.986, 0.33 ms p50 against
      199 ms for a flat scan on the same shared cores, 554 bytes per vector, memory-mapped lists of which
      a query touches ~1/64); HNSW-SQ8's build took ~11 minutes for 200k vectors here, too slow to merge 1M
      within compaction's timeout;
    - over the budget even then: ValueError; the caller shards the dataset (ShardPlan).
    """
    if vector_count <= flat_limit and bytes_per_vector(FLAT, dim) * vector_count <= memory_budget_bytes:
        return IndexSpec(FLAT)
    spec = ivf_spec(vector_count)
    if bytes_per_vector(spec.kind, dim) * vector_count > memory_budget_bytes:
        raise ValueError(
            f"{vector_count} vectors need {bytes_per_vector(spec.kind, dim) * vector_count / 2**20:.0f} MiB as "
            f"{spec.kind}, over the budget of {memory_budget_bytes / 2**20:.0f} MiB: shard the dataset"
        )
    return spec


def new_segment_id() -> str:
    """Sortable by creation time, unique without coordination."""
    return f"{time.time_ns() // 1_000_000:013d}-{uuid.uuid4().hex[:12]}"


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
