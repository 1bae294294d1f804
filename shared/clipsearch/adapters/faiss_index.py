"""FaissVectorIndex: the VectorIndex port on FAISS (build, serialize, memory-map, search, read back vectors).

Every segment is an IndexIDMap2 over an inner index chosen by its `IndexSpec` kind; the file is
self-describing, so loading never needs the kind. Inner products on L2-normalized vectors are cosines.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
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
# A filtered IVF search probes the nearest lists that hold selected ids (never lists without any), at
# least the index's own nprobe of them and enough to reach max(_FILTERED_MIN_CANDIDATES,
# _FILTERED_CANDIDATE_FACTOR x the selected ids an unfiltered probe would meet). At 100k clustered
# vectors (1264 lists, nprobe 20), recall@10 against exact filtered search was 0.97-0.995 for folders of
# 10% (correlated with the clusters or not), 1% and 50 images, every query filling k; FAISS's own
# selector on the plain probe returned 0.6 results per query for the 50 images and 7.6 of 10 for the
# correlated 10% folder (benchmarks/filtered_search.py).
_FILTERED_MIN_CANDIDATES = 256
_FILTERED_CANDIDATE_FACTOR = 2.0


class FaissIdSelection:
    """Only the given ids, or every id but them, as a FAISS selector shared by the searches of one request
    or snapshot."""

    def __init__(self, ids: np.ndarray, exclude: bool) -> None:
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.exclude = exclude
        self._lock = threading.Lock()
        self._batch: faiss.IDSelectorBatch | None = None
        self._selector: faiss.IDSelector | None = None

    @property
    def selector(self) -> faiss.IDSelector:
        """Built on first use: a filtered IVF search reads `ids` instead (0.5-1 ms saved at 10k ids)."""
        with self._lock:
            if self._selector is None:
                self._batch = faiss.IDSelectorBatch(self.ids)
                # IDSelectorNot holds a raw pointer to _batch: keep both.
                self._selector = faiss.IDSelectorNot(self._batch) if self.exclude else self._batch
            return self._selector


class FaissSegment:
    """A loaded segment: its vector ids and a top-k inner-product search at the depth it was built for."""

    def __init__(self, index: faiss.Index, nbytes: int) -> None:
        self._index = index
        self.ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        self.nbytes = nbytes
        inner = faiss.downcast_index(index.index)
        self._lists = _FilteredLists(inner, self.ids) if isinstance(inner, faiss.IndexIVF) else None
        self._probes = _ProbedLists.of(index)
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
        if self._lists is not None and selection is not None and not selection.exclude:
            # FAISS's selector only filters the lists the query probes: a selection whose ids sit in
            # other lists (a folder of other subjects, a few images) would come back short of k.
            with _one_faiss_thread():
                return self._lists.search(np.ascontiguousarray(query, dtype=np.float32), k, selection.ids)
        if self._probes is not None:
            query = self._probes.one_query(query)
            with _one_faiss_thread():
                return self._search_lists(query, k, *self._probed_lists(query), selection)
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

    def _probed_lists(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The lists this query probes and its centroid scores (`_ProbedLists.nearest`)."""
        return self._probes.nearest(query)

    def _search_lists(
        self, query: np.ndarray, k: int, lists: np.ndarray, centroid_scores: np.ndarray,
        selection: FaissIdSelection | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top k of an IVF segment's given lists, with every id but the excluded."""
        # The inner index numbers its vectors by position: a selector sees them through the id map.
        translated = None if selection is None else faiss.IDSelectorTranslated(self._index.id_map, selection.selector)
        scores, positions = _search_preassigned(self._probes.inner, query, k, lists, centroid_scores, translated)
        return scores, self.ids[positions]

    def _parameters(self, selection: FaissIdSelection | None) -> faiss.SearchParameters | None:
        # Built per call: IndexIDMap swaps the selector inside the parameters while it searches.
        return None if selection is None else self._params(selection.selector)


class _ProbedLists:
    """The lists an IVF segment's search probes, picked with a quarter of the memory traffic of its quantizer.

    A 1M dataset is five segments, each with a float32 quantizer of 1788 x 512 (3.7 MB) that a query reads
    whole, after the text tower has swept the caches: 18 MB of the ~26 MB a query read from memory.
    Here an 8-bit copy of the centroids (0.9 MB) picks twice the lists the segment probes, their float32
    centroids rank those exactly, and the nearest `nprobe` are probed with their exact inner products (an
    inner-product IVF adds them to every score): the same lists, the same scores as FAISS's own search,
    unless a list outside the 8-bit copy's 2 x nprobe would have been among the exact nprobe.
    """

    def __init__(self, owner: faiss.Index, inner: faiss.IndexIVF, centroids: np.ndarray) -> None:
        self._owner = owner  # owns `inner` and its quantizer, whose floats `centroids` views: kept alive with them
        self.inner = inner
        self._centroids = centroids
        self._compact = faiss.IndexScalarQuantizer(inner.d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        self._compact.train(centroids)
        self._compact.add(centroids)
        self._probes = min(inner.nprobe, inner.nlist)
        self._candidates = min(2 * self._probes, inner.nlist)

    @classmethod
    def of(cls, index: faiss.IndexIDMap) -> _ProbedLists | None:
        """For a segment whose inner index is an inner-product IVF over a flat quantizer (the IVF_SQ8 segments);
        None for others."""
        inner = faiss.downcast_index(index.index)
        if not isinstance(inner, faiss.IndexIVF) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
            return None
        quantizer = faiss.downcast_index(inner.quantizer)
        if not isinstance(quantizer, faiss.IndexFlat) or quantizer.ntotal != inner.nlist or inner.nlist == 0:
            return None
        centroids = faiss.rev_swig_ptr(quantizer.get_xb(), inner.nlist * inner.d).reshape(inner.nlist, inner.d)
        return cls(index, inner, centroids)

    def one_query(self, query: np.ndarray) -> np.ndarray:
        """The query as one contiguous float32 row: the searches below read it through a raw pointer."""
        query = np.ascontiguousarray(query, dtype=np.float32)
        if query.size != self.inner.d:
            raise ValueError(f"a query of {query.size} values for a segment of {self.inner.d}-d vectors")
        return query.reshape(1, self.inner.d)

    def nearest(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The lists to probe (int64, nearest first) and the query's inner product with each centroid
        (float32), both shaped (1, nprobe); `query` is one float32 row."""
        # Each step is one call into FAISS: numpy's fancy indexing, product and sort took 0.2 ms more per segment
        # with the caches cold.
        candidate_scores = np.empty((1, self._candidates), dtype=np.float32)
        candidates = np.empty((1, self._candidates), dtype=np.int64)
        self._compact.search_c(1, faiss.swig_ptr(query), self._candidates, faiss.swig_ptr(candidate_scores),
                               faiss.swig_ptr(candidates))
        scores = np.empty((1, self._probes), dtype=np.float32)
        lists = np.empty((1, self._probes), dtype=np.int64)
        faiss.knn_inner_products_by_idx(
            faiss.swig_ptr(query), faiss.swig_ptr(self._centroids), faiss.swig_ptr(candidates), self.inner.d, 1,
            self.inner.nlist, self._candidates, self._probes, faiss.swig_ptr(scores), faiss.swig_ptr(lists),
        )
        return lists, scores


def _search_preassigned(
    inner: faiss.IndexIVF, query: np.ndarray, k: int, lists: np.ndarray, centroid_scores: np.ndarray,
    selector: faiss.IDSelector | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The top k (scores, positions in the inner index) of one query over the given lists (int64, shaped (1, n))
    with the query's inner product with each list's centroid (float32, the same shape), all of them probed."""
    params = faiss.SearchParametersIVF(sel=selector, nprobe=lists.shape[1]) if selector is not None else (
        faiss.SearchParametersIVF(nprobe=lists.shape[1]))
    scores = np.empty((1, k), dtype=np.float32)
    positions = np.empty((1, k), dtype=np.int64)
    # The Python wrapper of search_preassigned refuses search parameters (the selector): call the C++ one.
    inner.search_preassigned_c(
        1, faiss.swig_ptr(query), k, faiss.swig_ptr(lists), faiss.swig_ptr(centroid_scores),
        faiss.swig_ptr(scores), faiss.swig_ptr(positions), False, params,
    )
    found = positions[0] >= 0
    return scores[0][found], positions[0][found]


class _FilteredLists:
    """A filtered search of one IVF segment that probes only lists holding selected ids, nearest first.

    The list of each stored vector is read once, on the first filtered search (4 bytes per vector, plus
    16 for the id lookup), not at load: most searches are not filtered.
    """

    def __init__(self, inner: faiss.IndexIVF, ids: np.ndarray) -> None:
        self._inner = inner
        self._ids = ids
        self._lock = threading.Lock()
        self._layout: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def search(self, query: np.ndarray, k: int, allowed_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inner = self._inner
        positions = self._positions(allowed_ids)
        if not len(positions):
            return np.empty(0, np.float32), np.empty(0, np.int64)
        list_of_position = self._layout_arrays()[2]
        selected_per_list = np.bincount(list_of_position[positions], minlength=inner.nlist)
        centroid_scores, nearest_lists = inner.quantizer.search(query, inner.nlist)
        holding = selected_per_list[nearest_lists[0]] > 0
        lists, scores = nearest_lists[0][holding], centroid_scores[0][holding]
        wanted = max(
            k, _FILTERED_MIN_CANDIDATES, _FILTERED_CANDIDATE_FACTOR * len(positions) * inner.nprobe / inner.nlist
        )
        enough = int(np.searchsorted(np.cumsum(selected_per_list[lists]), wanted)) + 1
        probes = min(len(lists), max(enough, inner.nprobe))
        admitted = np.zeros(len(self._ids), dtype=bool)
        admitted[positions] = True
        bitmap = np.packbits(admitted, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(admitted), faiss.swig_ptr(bitmap))
        found_scores, found = _search_preassigned(
            inner, query, k, np.ascontiguousarray(lists[None, :probes], dtype=np.int64),
            np.ascontiguousarray(scores[None, :probes], dtype=np.float32), selector,
        )
        return found_scores, self._ids[found]

    def _positions(self, allowed_ids: np.ndarray) -> np.ndarray:
        """Where the allowed ids this segment holds sit in it (the inner index numbers vectors by position)."""
        sorted_ids, order, _ = self._layout_arrays()
        at = np.minimum(np.searchsorted(sorted_ids, allowed_ids), len(sorted_ids) - 1)
        return order[at[sorted_ids[at] == allowed_ids]]

    def _layout_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            if self._layout is None:
                order = np.argsort(self._ids, kind="stable")
                list_of_position = np.empty(len(self._ids), dtype=np.int32)
                invlists = self._inner.invlists
                for list_number in range(self._inner.nlist):
                    size = invlists.list_size(list_number)
                    if size:
                        stored = invlists.get_ids(list_number)
                        list_of_position[faiss.rev_swig_ptr(stored, size)] = list_number
                        invlists.release_ids(list_number, stored)
                self._layout = (self._ids[order], order, list_of_position)
            return self._layout


# How an IVF segment file lies (faiss 1.15's index_write.cpp, checked against the files `write` makes): "IxM2"
# and an index header; the inner "IwSq" with its header, nlist and nprobe, its quantizer ("IxFI" + header +
# centroids as a uint64 byte count and bytes), direct map and scalar quantizer fields; the inverted lists as
# "ilar" nlist code_size "full" + their sizes (uint64 count, nlist uint64), then list 0's codes and ids
# (n x code_size bytes, n x int64), list 1's, ... in list order; last the id map (uint64 count, int64 ids).
_INDEX_HEADER = struct.Struct("<iqqq?i")  # d, ntotal, 2 unused, is_trained, metric type (+ float arg if > 1)
_UINT64 = struct.Struct("<Q")
_IVF_KINDS = {b"IwSq"}  # the IVF kinds this adapter writes (IVF_SQ8)
_FLAT_QUANTIZERS = {b"IxFI", b"IxF2", b"IxFl"}
# The first read holds every field before the centroids; the second the rest of the header, whose fields
# after the centroids take ~16 bytes per dimension (the scalar quantizer's ranges) plus 8 per list.
_FIRST_READ_BYTES = 64 * 1024
_HEADER_SLACK_BYTES = 64 * 1024
# Probed lists closer than this in the file are fetched as one ranged GET; fetches run on this many threads.
_COALESCE_GAP_BYTES = 256 * 1024
_LIST_FETCH_THREADS = 8


@dataclass(frozen=True)
class _IvfLayout:
    """Where an IVF segment's inverted lists lie in its file, and the file's header and id map."""

    header: bytes  # bytes [0, data_start), the list sizes included
    sizes_at: int  # offset of the nlist uint64 list sizes in `header`
    sizes: np.ndarray  # uint64 [nlist]
    list_offsets: np.ndarray  # int64 [nlist]: where each list's codes start in the file
    code_size: int
    id_map: bytes  # the file's last 8 + 8 x ntotal bytes

    @classmethod
    def read(cls, read_range: Callable[[int, int], bytes], size: int) -> _IvfLayout | None:
        first = read_range(0, min(size, _FIRST_READ_BYTES))
        try:
            return cls._parse(first, read_range, size)
        except (struct.error, ValueError):  # not the layout above: a file written another way
            return None

    @classmethod
    def _parse(cls, first: bytes, read_range: Callable[[int, int], bytes], size: int) -> _IvfLayout | None:
        if first[:4] != b"IxM2":
            return None
        dim, ntotal, _, _, _, metric = _INDEX_HEADER.unpack_from(first, 4)
        if metric != faiss.METRIC_INNER_PRODUCT:  # what this adapter writes (no metric argument follows)
            return None
        at = 4 + _INDEX_HEADER.size
        if first[at:at + 4] not in _IVF_KINDS:
            return None
        at += 4 + _INDEX_HEADER.size
        nlist, _ = struct.unpack_from("<QQ", first, at)
        at += 16
        if first[at:at + 4] not in _FLAT_QUANTIZERS:
            return None
        at += 4 + _INDEX_HEADER.size
        centroids_end = at + 8 + 4 * _UINT64.unpack_from(first, at)[0]  # a count of float32
        header_end = min(size, centroids_end + 16 * dim + 8 * nlist + _HEADER_SLACK_BYTES)
        id_map_start = size - 8 - 8 * ntotal
        with ThreadPoolExecutor(max_workers=2) as pool:
            rest = pool.submit(read_range, len(first), header_end) if header_end > len(first) else None
            id_map = read_range(id_map_start, size)
            header = first + rest.result() if rest is not None else first[:header_end]
        lists_at = header.find(b"ilar" + _UINT64.pack(nlist), centroids_end)
        if lists_at < 0:
            return None
        code_size = _UINT64.unpack_from(header, lists_at + 12)[0]
        if header[lists_at + 20:lists_at + 24] != b"full" or _UINT64.unpack_from(header, lists_at + 24)[0] != nlist:
            return None  # "sprs" (fewer than half the lists used) stores its sizes another way
        sizes_at = lists_at + 32
        sizes = np.frombuffer(header, dtype="<u8", count=nlist, offset=sizes_at)
        data_start = sizes_at + 8 * nlist
        list_bytes = sizes.astype(np.int64) * (code_size + 8)
        # The sizes must account for every byte between them and the id map, and the id map for every vector.
        if (int(sizes.sum()) != ntotal or data_start + int(list_bytes.sum()) != id_map_start
                or _UINT64.unpack_from(id_map, 0)[0] != ntotal):
            return None
        offsets = data_start + np.concatenate(([0], np.cumsum(list_bytes)[:-1]))
        return cls(header[:data_start], sizes_at, sizes.copy(), offsets.astype(np.int64), int(code_size), id_map)

    def empty_index(self) -> faiss.Index:
        """The segment with every list empty: trained, its ids and quantizer loaded, nothing to scan yet."""
        # As an IndexIDMap ("IxMp", the same layout), not IndexIDMap2: that one builds a hash map of every id
        # at load, which only reconstructing a vector by id needs.
        no_sizes = bytes(len(self.header) - self.sizes_at)
        skeleton = b"".join((b"IxMp", self.header[4:self.sizes_at], no_sizes, self.id_map))
        return faiss.deserialize_index(np.frombuffer(skeleton, dtype=np.uint8))


class PartialFaissSegment(FaissSegment):
    """An IVF segment whose inverted lists are fetched as searches probe them: a search fetches the lists
    it probes (picked as the whole segment picks them, `_ProbedLists`), adds them, and searches them, so it
    answers exactly as the whole segment would. A search admitting only some ids, a
    range search and reading the vectors first fetch every list. Fetching, adding and searching run under
    one lock: FAISS does not allow adding to lists while another thread scans them."""

    def __init__(self, layout: _IvfLayout, read_range: Callable[[int, int], bytes], size: int) -> None:
        super().__init__(layout.empty_index(), size)
        self._layout = layout
        self._read_range = read_range
        self._inner_ivf = faiss.downcast_index(self._index.index)
        self._fetched = layout.sizes == 0  # an empty list has nothing to fetch
        self._fetch_lock = threading.Lock()
        self.fetched_bytes = 0  # how much of the file the searches fetched so far
        if self._probes is None:  # an unfetched segment searched by FAISS itself would miss its lists
            raise ValueError("a segment opened in part needs an inner-product IVF over a flat quantizer")

    def search(
        self, query: np.ndarray, k: int, selection: FaissIdSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        with self._fetch_lock:
            if selection is not None and not selection.exclude:
                self._fetch(np.arange(len(self._fetched)))
            return super().search(query, k, selection)

    def _probed_lists(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As the whole segment's, with those lists fetched first (under the search's lock)."""
        lists, centroid_scores = super()._probed_lists(query)
        self._fetch(lists[0][lists[0] >= 0])  # -1: fewer lists than asked (a query of NaNs finds none)
        return lists, centroid_scores

    def range_search(self, queries, min_score, selection=None):
        with self._fetch_lock:
            self._fetch(np.arange(len(self._fetched)))
            return super().range_search(queries, min_score, selection)

    def vectors(self) -> np.ndarray:
        with self._fetch_lock:
            self._fetch(np.arange(len(self._fetched)))
            return super().vectors()

    def _fetch(self, lists: np.ndarray) -> None:
        missing = np.unique(lists[~self._fetched[lists]])
        if not len(missing):
            return
        layout = self._layout
        starts = layout.list_offsets[missing]
        ends = starts + layout.sizes[missing].astype(np.int64) * (layout.code_size + 8)
        runs: list[list[int]] = [[0]]  # positions in `missing` fetched by one ranged GET each
        for position in range(1, len(missing)):
            if starts[position] - ends[runs[-1][-1]] <= _COALESCE_GAP_BYTES:
                runs[-1].append(position)
            else:
                runs.append([position])
        spans = [(int(starts[run[0]]), int(ends[run[-1]])) for run in runs]
        # Every piece is in hand before any list is added: a failed read leaves no list half-added, so the
        # next search fetches the same lists again without adding any twice.
        pieces = list(_fetch_pool().map(lambda span: self._read_range(*span), spans)) if len(spans) > 1 else (
            [self._read_range(*spans[0])])
        invlists = self._inner_ivf.invlists
        for run, (span_start, _), piece in zip(runs, spans, pieces):
            for position in run:
                list_number, count = int(missing[position]), int(layout.sizes[missing[position]])
                codes_at = int(starts[position]) - span_start
                ids_at = codes_at + count * layout.code_size
                codes = np.frombuffer(piece, dtype=np.uint8, count=count * layout.code_size, offset=codes_at).copy()
                ids = np.frombuffer(piece, dtype="<i8", count=count, offset=ids_at).astype(np.int64)
                invlists.add_entries(list_number, count, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
            self.fetched_bytes += len(piece)
        self._fetched[missing] = True


_fetch_threads: ThreadPoolExecutor | None = None
_fetch_threads_guard = threading.Lock()


def _fetch_pool() -> ThreadPoolExecutor:
    """The threads fetching probed lists, shared by every partial segment (made on first use)."""
    global _fetch_threads
    with _fetch_threads_guard:
        if _fetch_threads is None:
            _fetch_threads = ThreadPoolExecutor(max_workers=_LIST_FETCH_THREADS, thread_name_prefix="ivf-lists")
        return _fetch_threads


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

    def open_partial(self, read_range: Callable[[int, int], bytes], size: int) -> PartialFaissSegment | None:
        """An IVF segment read in parts: its header and id map now (a few MB), each inverted list when a
        search first probes it. None for other kinds, which are opened whole."""
        layout = _IvfLayout.read(read_range, size)
        if layout is None:
            return None
        return PartialFaissSegment(layout, read_range, size)

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

