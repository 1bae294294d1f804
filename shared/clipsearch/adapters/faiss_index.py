"""FaissVectorIndex: the VectorIndex port on FAISS (build, serialize, memory-map, search, read back vectors).

Every segment is an IndexIDMap2 over an inner index chosen by its `IndexSpec` kind; the file is
self-describing, so loading never needs the kind. Inner products on L2-normalized vectors are cosines.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from clipsearch.segments import (
    FLAT,
    HNSW,
    HNSW_SQ8,
    IVF_SQ8,
    SQ8,
    IndexSpec,
    SegmentVectors,
)

# FAISS switches to its bundled BLAS for >= 20 queries at once, ~10x slower here (FACTS.md).
_BLAS_THRESHOLD = 1_000_000
# Training k-means on more than ~256 points per list gains no recall and costs build time.
_TRAIN_POINTS_PER_LIST = 256


class FaissIdSelection:
    """Only the given ids, or every id but them, as a FAISS selector shared by the searches of one request
    or snapshot."""

    def __init__(self, ids: np.ndarray, exclude: bool) -> None:
        self._batch = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        # IDSelectorNot holds a raw pointer to _batch: keep both.
        self.selector = faiss.IDSelectorNot(self._batch) if exclude else self._batch


class FaissSegment:
    """A loaded segment: its vector ids and a top-k inner-product search at the depth it was built for."""

    def __init__(self, index: faiss.Index, nbytes: int) -> None:
        self._index = index
        self.ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        self.nbytes = nbytes
        inner = faiss.downcast_index(index.index)
        # Search parameters replace the index's own, so a filtered search must repeat its depth.
        if isinstance(inner, faiss.IndexHNSW):
            self._params = lambda sel: faiss.SearchParametersHNSW(sel=sel, efSearch=inner.hnsw.efSearch)
        elif isinstance(inner, faiss.IndexIVF):
            self._params = lambda sel: faiss.SearchParametersIVF(sel=sel, nprobe=inner.nprobe)
        else:
            self._params = lambda sel: faiss.SearchParameters(sel=sel)

    def __len__(self) -> int:
        return self._index.ntotal

    def search(
        self, query: np.ndarray, k: int, selection: FaissIdSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self._index.ntotal)
        if k == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        with _one_faiss_thread():
            scores, ids = self._index.search(
                np.ascontiguousarray(query, dtype=np.float32), k, params=self._parameters(selection)
            )
        found = ids[0] >= 0
        return scores[0][found], ids[0][found]

    def range_search(
        self, queries: np.ndarray, min_score: float, selection: FaissIdSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        limits, scores, ids = self._index.range_search(
            np.ascontiguousarray(queries, dtype=np.float32), min_score, params=self._parameters(selection)
        )
        return limits, scores, ids

    def vectors(self) -> np.ndarray:
        if not self._index.ntotal:
            return np.empty((0, self._index.d), np.float32)
        inner = faiss.downcast_index(self._index.index)
        if isinstance(inner, faiss.IndexIVF):
            inner.make_direct_map()
        return np.asarray(inner.reconstruct_n(0, self._index.ntotal), dtype=np.float32)

    def _parameters(self, selection: FaissIdSelection | None) -> faiss.SearchParameters | None:
        # Built per call: IndexIDMap swaps the selector inside the parameters while it searches.
        return None if selection is None else self._params(selection.selector)


class FaissVectorIndex:
    """Builds segments of any `IndexSpec` kind, loads them from bytes or memory-maps them from files."""

    def __init__(self) -> None:
        faiss.cvar.distance_compute_blas_threshold = _BLAS_THRESHOLD

    def build(self, content: SegmentVectors, spec: IndexSpec) -> bytes:
        return faiss.serialize_index(self._build_index(content, spec)).tobytes()

    def write(self, content: SegmentVectors, spec: IndexSpec, destination: Path) -> int:
        """Writes the segment file at `destination` (the bytes never sit in memory whole); returns its size."""
        index = self._build_index(content, spec)
        faiss.write_index(index, str(destination))
        return destination.stat().st_size

    def load(self, data: bytes) -> FaissSegment:
        return FaissSegment(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), len(data))

    def open(self, path: Path) -> FaissSegment:
        """The segment file memory-mapped where FAISS can (flat codes and IVF lists): pages are read on
        demand and shared with the page cache, so a loaded segment costs about its size once."""
        return FaissSegment(faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC), path.stat().st_size)

    def read_vectors(self, data: bytes | Path) -> SegmentVectors:
        """The ids and vectors a segment holds, for merging (decoded: approximate for compressed kinds)."""
        segment = self.open(data) if isinstance(data, Path) else self.load(data)
        return SegmentVectors(segment.ids, segment.vectors())

    def exclusion(self, excluded_ids: np.ndarray) -> FaissIdSelection:
        return FaissIdSelection(excluded_ids, exclude=True)

    def selection(self, allowed_ids: np.ndarray) -> FaissIdSelection:
        return FaissIdSelection(allowed_ids, exclude=False)

    def _build_index(self, content: SegmentVectors, spec: IndexSpec) -> faiss.Index:
        vectors = np.ascontiguousarray(content.vectors, dtype=np.float32)
        dim = vectors.shape[1]
        inner = _inner_index(spec, dim)
        if not inner.is_trained:
            inner.train(_training_sample(vectors, spec.lists * _TRAIN_POINTS_PER_LIST))
        index = faiss.IndexIDMap2(inner)
        index.add_with_ids(vectors, np.ascontiguousarray(content.ids, dtype=np.int64))
        return index


def _inner_index(spec: IndexSpec, dim: int) -> faiss.Index:
    inner_product = faiss.METRIC_INNER_PRODUCT
    if spec.kind == FLAT:
        return faiss.IndexFlatIP(dim)
    if spec.kind == SQ8:
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, inner_product)
    if spec.kind in (HNSW, HNSW_SQ8):
        if spec.kind == HNSW:
            index = faiss.IndexHNSWFlat(dim, spec.neighbors, inner_product)
        else:
            index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, spec.neighbors, inner_product)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
        return index
    if spec.kind == IVF_SQ8:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, spec.lists, faiss.ScalarQuantizer.QT_8bit, inner_product
        )
        index.nprobe = spec.probes
        index.own_fields = True
        quantizer.this.disown()
        return index
    raise ValueError(f"unknown index kind {spec.kind!r}")


@contextmanager
def _one_faiss_thread() -> Iterator[None]:
    """One query scans faster on one OpenMP thread than on two (benchmarks/search.py), and leaves the
    other core to a concurrent request. The setting is per calling thread (libgomp keeps it in the
    thread's own task), so compaction running in the same process (the local stack) keeps every core."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _training_sample(vectors: np.ndarray, count: int) -> np.ndarray:
    if len(vectors) <= count:
        return vectors
    rows = np.random.default_rng(0).choice(len(vectors), count, replace=False)
    return vectors[np.sort(rows)]

