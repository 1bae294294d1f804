"""The search use case: embed a query, search the dataset's cached segments, return the top hits with paths.

Warm caches live for the execution environment: the encoders (built lazily, text and vision apart, so
a text query never loads the vision graph) and, per dataset, an immutable snapshot of its loaded
segments and deleted ids. Each request reads the dataset row once; when `index_version` moved, only
new segments are fetched (in parallel), retired ones are dropped and the deleted ids re-read.
Snapshots are swapped whole, so concurrent requests never see a half-refreshed index.

Deleted ids are excluded inside the index (an id selection), so a query costs the same however many
vectors await compaction; filters (key prefix, ingest time) are id selections too, built from the
catalog's matching ids, so a filtered page holds k hits without fetching more and dropping. Pages are
cut from one ranking ordered by (score, id), the same for every page while the dataset does not change.
Segments are fetched into a scratch directory and opened memory-mapped, so a loaded segment costs about
its file size once; the snapshots together stay under a byte budget, the least recently searched
dataset dropped first.

Cold start: when the segments a refresh must load hold at least `partial_load_min_bytes`, they are first
opened in part (their headers, a few MB; each query then fetches the inverted lists it probes, answering
exactly as the whole segments would), and after the first answer one background thread downloads them
whole and swaps them into the snapshot. Until then a query fetches its own missing lists (~25 ranged GETs,
~2 MB, per 200k-vector segment, against the whole download's seconds); a filtered query or a duplicates
scan, which reads most lists, waits for the whole segments instead. A failed background download is logged and
started again by the next query; a query that waits for it gets its error. In Lambda the environment is
frozen between requests, so the download advances only while requests run (a thawed connection that was
reset fails the attempt, and the next query starts it again).

Fan-out: given a ShardSearcher, a dataset whose segment objects together exceed that budget is never
loaded here. Its snapshot is a shard plan (clipsearch.shards); a query is embedded once, every shard's
top (offset + k) is asked in parallel, with the same deleted-id exclusion and filters, and the merged
ranking is cut into pages and resolved to paths as a local one is. `ShardSearchService` is the shard
searcher's side: the shard's segments kept loaded, the dataset's deleted ids read per index_version.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from clipsearch.datasets import check_caller_image_key, thumbnail_key, validate_dataset_name
from clipsearch.errors import (
    DatasetNotFound,
    ImageTooLarge,
    InvalidRequest,
    ModelMismatch,
    ObjectNotFound,
    TransientError,
)
from clipsearch.filter_selections import FilterSelections, Selection
from clipsearch.lazy import Lazy
from clipsearch.ports import (
    Dataset,
    IdSelection,
    ImageLocation,
    ObjectStore,
    SearchCatalog,
    SegmentRef,
    SegmentSearcher,
    ShardQuery,
    ShardSearcher,
    VectorIndex,
)
from clipsearch.search_results import (
    DEFAULT_K,
    MAX_K,
    MIN_COMBINED_NORM,
    MIN_DUPLICATE_SCORE,
    DuplicateGroup,
    DuplicateReport,
    ImageFilter,
    InvalidParameter,
    QueryTerm,
    SearchHit,
    SearchOptions,
    SearchResult,
    check_terms,
)
from clipsearch.shards import SegmentOverBudget, ShardedIndex, SizedSegment, plan_shards

logger = logging.getLogger(__name__)

# How often the live segments and deleted ids are read again when a commit lands between the reads.
_CONSISTENT_READ_ATTEMPTS = 5
# Finding duplicates compares every vector with every other: 20k x 20k x 512 is ~2e11 multiply-adds,
# a few seconds on two cores. Beyond that it needs an approximate pass (not built).
MAX_DUPLICATE_SCAN = 20_000
# Shards asked at once by one query: beyond this many shards, a query waits for a free thread.
FAN_OUT_THREADS = 16
# The template's search function has ~1.7 vCPUs (3008 MB): two threads keep both busy.
QUERY_THREADS = 2
# Below this, a dataset's segments are searched one after another: a thread hand-off costs about what
# searching a few small ingest-batch segments does.
PARALLEL_SEARCH_MIN_BYTES = 32 * 2**20
# A page shows its thumbnails at once; a short expiry limits what a copied URL gives away.
THUMBNAIL_URL_SECONDS = 900
# Segments to load that together hold at least this are opened in part first (see the module's doc). Below
# it a cold start downloads them whole while the query's model loads (~0.5-1 s; ~240 MB/s from the local
# store here): the whole download is then off the first answer's path, fetching probed lists would not be
# (100k vectors, 55 MB: first answer after the model either way, +0.24 s with lists fetched, load 5).
PARTIAL_LOAD_MIN_BYTES = 128 * 2**20
# While segments are opened in part a query searches them on up to this many threads (each mostly waits for its lists).
IN_PART_SEARCH_THREADS = 8


class QueryVector(Protocol):
    vector: np.ndarray  # float32 [embedding_dim], L2-normalized


class TextQuery(QueryVector, Protocol):
    truncated: bool  # the query was longer than the model's context


class TextQueryEncoder(Protocol):
    def embed_text(self, text: str) -> TextQuery: ...


class ImageQueryEncoder(Protocol):
    def embed_image(self, data: bytes, name: str) -> QueryVector: ...  # raises InvalidImage, ImageTooLarge


# The warm caches a request can find ready ("hit") or have to fill ("miss"), as told to a CacheListener.
ENCODER_CACHE = "encoder"  # the query's tower, loaded once per execution environment
INDEX_CACHE = "index"  # the dataset's snapshot of loaded segments, current for its index_version


class CacheListener(Protocol):
    def __call__(self, cache: str, hit: bool) -> None: ...



@dataclass(frozen=True)
class LoadedSegment:
    ref: SegmentRef
    segment: SegmentSearcher
    complete: bool = True  # False: opened in part, its lists fetched as queries probe them


@dataclass(frozen=True)
class DatasetIndex:
    """One dataset's segments as of `index_version`, with the deleted ids each segment still holds."""

    dataset_id: int
    index_version: int
    segments: tuple[LoadedSegment, ...]
    deleted_per_segment: tuple[int, ...]
    deleted_ids: np.ndarray  # int64, sorted
    excluded: IdSelection | None  # every id but the deleted ones; None when nothing is deleted

    @classmethod
    def build(
        cls, dataset: Dataset, segments: Sequence[LoadedSegment], deleted_ids: set[int], vector_index: VectorIndex
    ) -> DatasetIndex:
        return cls.of(dataset.id, dataset.index_version, segments, deleted_ids, vector_index)

    @classmethod
    def of(
        cls, dataset_id: int, index_version: int, segments: Sequence[LoadedSegment], deleted_ids: set[int],
        vector_index: VectorIndex,
    ) -> DatasetIndex:
        deleted = np.array(sorted(deleted_ids), dtype=np.int64)
        return cls(
            dataset_id=dataset_id,
            index_version=index_version,
            segments=tuple(segments),
            deleted_per_segment=tuple(
                int(np.isin(loaded.segment.ids, deleted, assume_unique=True).sum()) for loaded in segments
            ),
            deleted_ids=deleted,
            excluded=vector_index.exclusion(deleted) if len(deleted) else None,
        )

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids and vectors of every live image, each once."""
        id_parts, vector_parts = [], []
        for loaded, deleted_count in zip(self.segments, self.deleted_per_segment):
            ids, vectors = loaded.segment.ids, loaded.segment.vectors()
            if deleted_count:
                keep = ~np.isin(ids, self.deleted_ids)
                ids, vectors = ids[keep], vectors[keep]
            id_parts.append(ids)
            vector_parts.append(vectors)
        if not id_parts:
            return np.empty(0, np.int64), np.empty((0, 0), np.float32)
        ids, first = np.unique(np.concatenate(id_parts), return_index=True)
        return ids, np.ascontiguousarray(np.concatenate(vector_parts)[first])

    @property
    def nbytes(self) -> int:
        return sum(loaded.segment.nbytes for loaded in self.segments)

    @property
    def complete(self) -> bool:
        """False while a segment is still opened in part."""
        return all(loaded.complete for loaded in self.segments)

    def with_loaded(self, replacements: Mapping[str, LoadedSegment]) -> DatasetIndex:
        """The same snapshot with the segments of these ids replaced (the same vectors, loaded another way)."""
        return replace(self, segments=tuple(replacements.get(loaded.ref.id, loaded) for loaded in self.segments))

    def is_current(self, dataset: Dataset) -> bool:
        """True when this snapshot is at least as new as the row a request read (a refresh may have
        read a newer version than the row that asked for it)."""
        return self.dataset_id == dataset.id and self.index_version >= dataset.index_version

    def search(
        self, vector: np.ndarray, k: int, allowed: IdSelection | None = None, pool: Executor | None = None
    ) -> list[tuple[int, float]]:
        """The k best live (image id, score) pairs, ties broken by id: a segment holding deleted vectors
        searches through the exclusion (the others without, which is faster); `allowed`, holding only
        live ids, replaces it in every segment; an id found in two segments counts once. With a `pool`,
        the segments are searched on this thread and one of its threads (FAISS releases the GIL): 1M
        vectors are 5 segments. While segments are opened in part, they are searched on up to
        IN_PART_SEARCH_THREADS threads at once."""

        def search_segment(segment: tuple[LoadedSegment, int]) -> tuple[np.ndarray, np.ndarray]:
            loaded, deleted_count = segment
            selection = allowed if allowed is not None else (self.excluded if deleted_count else None)
            return loaded.segment.search(vector, k, selection)

        segments = list(zip(self.segments, self.deleted_per_segment))
        if not self.complete and len(segments) > 1:
            # Segments opened in part first fetch the lists they probe: mostly waiting on the store, they are
            # searched all at once (the first query at 1M: five segments, ~25 ranged GETs each).
            threads = min(len(segments), IN_PART_SEARCH_THREADS)
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="search-in-part") as in_part:
                answers = list(in_part.map(search_segment, segments))
        elif pool is not None and len(segments) > 1 and self.nbytes >= PARALLEL_SEARCH_MIN_BYTES:
            # This thread searches too, beside one pool thread, both taking the next segment from one iterator
            # (its `next` is atomic under the GIL): one hand-over per query, and this thread waits only for
            # the other's last segment, instead of sleeping until two pool threads have done them all.
            remaining = iter(segments)
            helper = pool.submit(lambda: [search_segment(segment) for segment in remaining])
            try:
                answers = [search_segment(segment) for segment in remaining]
            except BaseException:
                for _ in remaining:  # the helper stops after its current segment, before this error is raised
                    pass
                wait_for_futures([helper])
                raise
            answers += helper.result()
        else:
            answers = [search_segment(segment) for segment in segments]
        candidates: list[tuple[float, int]] = []
        for scores, ids in answers:
            candidates.extend(zip(scores.tolist(), ids.tolist()))
        candidates.sort(key=lambda candidate: (-candidate[0], candidate[1]))
        hits: list[tuple[int, float]] = []
        seen: set[int] = set()
        for score, image_id in candidates:
            if image_id not in seen:
                seen.add(image_id)
                hits.append((image_id, score))
                if len(hits) == k:
                    break
        return hits


class SegmentLoader:
    """Fetches segments into a scratch directory (in parallel) and opens them memory-mapped; knows their sizes."""

    def __init__(self, store: ObjectStore, vector_index: VectorIndex, segment_dir: Path, threads: int = 8) -> None:
        self._store = store
        self._vector_index = vector_index
        self._segment_dir = segment_dir
        self._threads = threads
        self._sizes: dict[str, int] = {}  # segment id -> object size: segments never change

    def load(self, refs: Sequence[SegmentRef]) -> Mapping[str, LoadedSegment]:
        if len(refs) <= 1:
            return {ref.id: self._load(ref) for ref in refs}
        with ThreadPoolExecutor(max_workers=min(self._threads, len(refs))) as pool:
            return {loaded.ref.id: loaded for loaded in pool.map(self._load, refs)}

    def load_partial(self, refs: Sequence[SegmentRef]) -> Mapping[str, LoadedSegment]:
        """Each segment opened in part where its format allows (else whole), in parallel."""
        sizes = {sized.ref.id: sized.nbytes for sized in self.sized(refs)}

        def open_one(ref: SegmentRef) -> LoadedSegment:
            read_range = _segment_reader(self._store, ref)
            try:
                partial = self._vector_index.open_partial(read_range, sizes[ref.id])
            except ObjectNotFound as error:
                raise TransientError(f"segment {ref.object_key} disappeared while loading") from error
            return self._load(ref) if partial is None else LoadedSegment(ref, partial, complete=False)

        with ThreadPoolExecutor(max_workers=max(1, min(self._threads, len(refs)))) as pool:
            return {loaded.ref.id: loaded for loaded in pool.map(open_one, refs)}

    def sized(self, refs: Sequence[SegmentRef]) -> list[SizedSegment]:
        """Each segment with its object's size (asked of the store once per segment, in parallel)."""
        missing = [ref for ref in refs if ref.id not in self._sizes]
        if missing:
            with ThreadPoolExecutor(max_workers=min(self._threads, len(missing))) as pool:
                for ref, info in zip(missing, pool.map(lambda ref: self._store.head(ref.object_key), missing)):
                    if info is None:
                        raise TransientError(f"segment {ref.object_key} disappeared while sizing the dataset")
                    self._sizes[ref.id] = info.size
        return [SizedSegment(ref, self._sizes[ref.id]) for ref in refs]

    def _load(self, ref: SegmentRef) -> LoadedSegment:
        self._segment_dir.mkdir(parents=True, exist_ok=True)
        path = self._segment_dir / f"{ref.id}.{threading.get_ident()}.segment"
        try:
            self._store.download_file(ref.object_key, path)
            # The mapping keeps the unlinked file's pages: nothing is left in /tmp to clean up.
            return LoadedSegment(ref, self._vector_index.open(path))
        except ObjectNotFound as error:
            # Retired by a compaction between reading the catalog and fetching: the next try sees it.
            raise TransientError(f"segment {ref.object_key} disappeared while loading") from error
        finally:
            path.unlink(missing_ok=True)


def _segment_reader(store: ObjectStore, ref: SegmentRef) -> Callable[[int, int], bytes]:
    def read_range(start: int, end: int) -> bytes:
        try:
            return store.get_range(ref.object_key, start, end)
        except ObjectNotFound as error:  # retired and removed after its grace period: the next refresh sees it
            raise TransientError(f"segment {ref.object_key} disappeared while being read") from error

    return read_range


Snapshot = DatasetIndex | ShardedIndex


class SearchService:
    """Text and image search over one model's datasets, with caches kept warm between requests."""

    def __init__(
        self,
        catalog: SearchCatalog,
        store: ObjectStore,
        model_id: str,
        text_encoder: Callable[[], TextQueryEncoder] | Lazy[TextQueryEncoder],
        image_encoder: Callable[[], ImageQueryEncoder],
        max_image_bytes: int,
        vector_index: VectorIndex,
        segment_dir: Path,
        index_cache_bytes: float = float("inf"),
        segment_load_threads: int = 8,
        shard_searcher: ShardSearcher | None = None,
        shard_budget_bytes: float = float("inf"),
        partial_load_min_bytes: float = PARTIAL_LOAD_MIN_BYTES,
    ) -> None:
        """With a `shard_searcher`, a dataset over `index_cache_bytes` is searched by shards of at most
        `shard_budget_bytes` each (what one shard searcher may hold); without one it is loaded here.
        Segments to load holding `partial_load_min_bytes` or more are opened in part first."""
        self._catalog = catalog
        self._store = store
        self._vector_index = vector_index
        self._segments = SegmentLoader(store, vector_index, segment_dir, segment_load_threads)
        self._index_cache_bytes = index_cache_bytes
        self._shard_searcher = shard_searcher
        self._shard_budget_bytes = shard_budget_bytes
        self._fan_out = Lazy(lambda: ThreadPoolExecutor(max_workers=FAN_OUT_THREADS, thread_name_prefix="fan-out"))
        # A query's own parallel work (a share of its segments' searches); a task here never waits for another here.
        self._query_threads = Lazy(lambda: ThreadPoolExecutor(max_workers=QUERY_THREADS, thread_name_prefix="query"))
        self.model_id = model_id
        # A Lazy given as is: the search function starts building it during init, and `ready` must say so.
        self._text_encoder = text_encoder if isinstance(text_encoder, Lazy) else Lazy(text_encoder)
        self._image_encoder = Lazy(image_encoder)
        self._max_image_bytes = max_image_bytes
        self._background = Lazy(lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="warm-up"))
        self._indexes: OrderedDict[str, Snapshot] = OrderedDict()  # least recently searched first
        self._refresh_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._cache_listener: CacheListener = _ignore_cache_lookup
        self._filter_selections = FilterSelections(catalog, vector_index)
        self._partial_load_min_bytes = partial_load_min_bytes
        # One thread downloads segments opened in part whole, so it never takes both cores from queries.
        self._whole_loads = Lazy(lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment-load"))
        self._whole_load_futures: dict[str, Future] = {}

    def wait_for_segments(self, timeout: float | None = None) -> bool:
        """Waits until every segment opened in part has been loaded whole (or failed); True when none is left
        loading. For benchmarks and tests: searches never need to."""
        with self._locks_guard:
            running = list(self._whole_load_futures.values())
        return not wait_for_futures(running, timeout).not_done

    def listen_to_caches(self, listener: CacheListener) -> None:
        """From now on, `listener(cache, hit)` hears of each request's lookup of ENCODER_CACHE and INDEX_CACHE,
        on the request's thread (metrics, without this module knowing how they are published)."""
        self._cache_listener = listener

    def search_text(
        self, dataset: str, query: str, k: int = DEFAULT_K, presign: bool = False,
        options: SearchOptions = SearchOptions(),
    ) -> SearchResult:
        _check_k(k)
        options.check()
        if not query.strip():
            raise InvalidRequest("query is empty")
        validate_dataset_name(dataset)  # a bad name is refused before the text tower runs
        self._warm_up(self._text_encoder)
        # The row is read before the text is embedded, on this thread (~0.2-0.3 ms). Read on a query thread beside
        # the tower it took as long as the tower (17 ms median at 10k, the handler's stages timed per thread, load
        # ~4: the tower's two threads busy both cores), and this thread then waited for it.
        row = self._dataset(dataset)
        self._prefetch_index(row)
        embedded = self._text_encoder.get().embed_text(query)
        return self._search(row, embedded.vector, k, presign, options, truncated=embedded.truncated)

    def search_image(
        self, dataset: str, image: bytes, name: str = "query image", k: int = DEFAULT_K, presign: bool = False,
        options: SearchOptions = SearchOptions(),
    ) -> SearchResult:
        _check_k(k)
        options.check()
        self._check_image(name, image)
        self._warm_up(self._image_encoder)
        row = self._dataset(dataset)
        self._prefetch_index(row)
        embedding = self._image_encoder.get().embed_image(image, name)
        return self._search(row, embedding.vector, k, presign, options)

    def search_stored_image(
        self, dataset: str, key: str, k: int = DEFAULT_K, presign: bool = False,
        options: SearchOptions = SearchOptions(),
    ) -> SearchResult:
        """Query by an image already in the bucket, under datasets/<dataset>/ (missing -> ObjectNotFound),
        within the request byte limit (checked on its size before it is fetched)."""
        _check_k(k)
        options.check()
        check_caller_image_key(dataset, key)
        self._warm_up(self._image_encoder)
        row = self._dataset(dataset)
        self._prefetch_index(row)
        embedding = self._image_encoder.get().embed_image(self._stored_image(key), key)
        return self._search(row, embedding.vector, k, presign, options)

    def search_terms(
        self, dataset: str, terms: Sequence[QueryTerm], k: int = DEFAULT_K, presign: bool = False,
        options: SearchOptions = SearchOptions(),
    ) -> SearchResult:
        """Query arithmetic: the normalized weighted sum of the terms' embeddings (a negative weight
        pushes results away from its term)."""
        _check_k(k)
        options.check()
        check_terms(terms)
        for position, term in enumerate(terms):
            if term.key is not None:
                check_caller_image_key(dataset, term.key)
            if term.image is not None:
                self._check_image(f"terms[{position}].image_base64", term.image)
        if any(term.text is not None for term in terms):
            self._warm_up(self._text_encoder)
        if any(term.text is None for term in terms):
            self._warm_up(self._image_encoder)
        row = self._dataset(dataset)
        self._prefetch_index(row)
        combined = np.zeros(0, np.float32)
        truncated = False
        for position, term in enumerate(terms):
            if term.text is not None:
                embedding = self._text_encoder.get().embed_text(term.text)
                truncated = truncated or embedding.truncated
            elif term.image is not None:
                embedding = self._image_encoder.get().embed_image(term.image, f"terms[{position}].image_base64")
            else:
                embedding = self._image_encoder.get().embed_image(self._stored_image(term.key), term.key)
            weighted = term.weight * np.asarray(embedding.vector, dtype=np.float32)
            combined = weighted if not combined.size else combined + weighted
        norm = float(np.linalg.norm(combined))
        if norm < MIN_COMBINED_NORM:
            raise InvalidParameter("terms", "the weighted terms cancel out: their sum points nowhere")
        return self._search(row, combined / norm, k, presign, options, truncated=truncated)

    def find_duplicates(self, dataset: str, min_score: float) -> DuplicateReport:
        """Groups of images whose vectors score at least `min_score` with another member (a range search
        of every live vector against every segment), biggest groups first."""
        if not (np.isfinite(min_score) and MIN_DUPLICATE_SCORE <= min_score <= 1):
            raise InvalidParameter("min_score", f"must be between {MIN_DUPLICATE_SCORE} and 1, got {min_score}")
        row = self._dataset(dataset)
        index = self._index(row)
        if isinstance(index, DatasetIndex) and not index.complete:
            index = self._whole_index(row, index)
        if isinstance(index, ShardedIndex):
            stored = index.vector_count
        else:
            stored = sum(len(loaded.segment.ids) for loaded in index.segments)
        # Refused before any vector is copied out of the index; a sharded dataset is far over the limit.
        if isinstance(index, ShardedIndex) or stored > MAX_DUPLICATE_SCAN:
            raise InvalidRequest(
                f"dataset {dataset!r} has {stored} vectors; finding duplicates scans at most {MAX_DUPLICATE_SCAN}"
            )
        ids, vectors = index.live_vectors()
        links: dict[tuple[int, int], float] = {}
        if len(ids):
            for loaded, deleted_count in zip(index.segments, index.deleted_per_segment):
                limits, scores, found = loaded.segment.range_search(
                    vectors, min_score, index.excluded if deleted_count else None
                )
                for row_number, image_id in enumerate(ids.tolist()):
                    start, end = limits[row_number], limits[row_number + 1]
                    for score, other in zip(scores[start:end].tolist(), found[start:end].tolist()):
                        if other != image_id:
                            pair = (min(image_id, other), max(image_id, other))
                            links[pair] = max(score, links.get(pair, -1.0))
        return DuplicateReport(row.name, row.model_id, min_score, self._duplicate_groups(links))

    def _duplicate_groups(self, links: Mapping[tuple[int, int], float]) -> list[DuplicateGroup]:
        parent: dict[int, int] = {}

        def root(image_id: int) -> int:
            parent.setdefault(image_id, image_id)
            while parent[image_id] != image_id:
                parent[image_id] = parent[parent[image_id]]
                image_id = parent[image_id]
            return image_id

        best_link: dict[int, float] = {}
        for (first, second), score in links.items():
            parent[root(first)] = root(second)
            for image_id in (first, second):
                best_link[image_id] = max(score, best_link.get(image_id, -1.0))
        locations = self._catalog.image_locations(list(best_link)) if best_link else {}
        members: dict[int, list[int]] = {}
        for image_id in best_link:
            if image_id in locations:  # removed since the index snapshot
                members.setdefault(root(image_id), []).append(image_id)
        groups = []
        for group in members.values():
            if len(group) < 2:
                continue
            group.sort(key=lambda image_id: locations[image_id].key)
            groups.append(DuplicateGroup([
                self._hit(position + 1, best_link[image_id], locations[image_id], presign=False)
                for position, image_id in enumerate(group)
            ]))
        groups.sort(key=lambda group: (-len(group.hits), group.hits[0].key))
        return groups

    def _stored_image(self, key: str) -> bytes:
        info = self._store.head(key)
        if info is None:
            raise ObjectNotFound(key)
        self._check_size(key, info.size)
        image = self._store.get(key)
        self._check_size(key, len(image.data))  # replaced by a larger object since the head
        return image.data

    def _check_image(self, name: str, image: bytes) -> None:
        self._check_size(name, len(image))
        if not image:
            raise InvalidRequest(f"{name}: the image is empty")

    def _check_size(self, name: str, size: int) -> None:
        if size > self._max_image_bytes:
            raise ImageTooLarge(name, f"{size} bytes is over the limit of {self._max_image_bytes}")

    def _dataset(self, name: str) -> Dataset:
        """The dataset row; the catalog rejects an invalid name (InvalidDatasetName) as it reads it."""
        try:
            row = self._catalog.get_dataset(name)
        except DatasetNotFound:
            self._indexes.pop(name, None)
            raise
        if row.model_id != self.model_id:
            raise ModelMismatch(
                f"dataset {name!r} was embedded by model {row.model_id!r}; this function serves {self.model_id!r}"
            )
        return row

    def _search(
        self, dataset: Dataset, vector: np.ndarray, k: int, presign: bool, options: SearchOptions,
        truncated: bool = False,
    ) -> SearchResult:
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        index = self._index(dataset)
        self._mark_searched(dataset.name)
        ranked: list[tuple[int, float]] = []
        if isinstance(index, ShardedIndex):
            ranked = index.search(self._shard_searcher, self._fan_out.get(), query, options.offset + k,
                                  options.image_filter)
        else:
            allowed = self._filter_selection(dataset, index, options.image_filter)
            if allowed is not None and allowed is not False and not index.complete:
                index = self._whole_index(dataset, index)  # a filter reads lists the query does not probe
                # The whole snapshot may be newer than the partial one: its own deleted ids, its own selection.
                allowed = self._filter_selection(dataset, index, options.image_filter)
            if allowed is not False:
                ranked = index.search(query, options.offset + k, allowed, self._query_threads.get())
            if not index.complete:
                self._load_whole_in_background(dataset.name)
        if options.min_score is not None:
            ranked = [(image_id, score) for image_id, score in ranked if score >= options.min_score]
        autocut_at = None
        if options.autocut:
            autocut_at = largest_gap_cut([score for _, score in ranked])
            ranked = ranked[:autocut_at]
        page = ranked[options.offset:options.offset + k]
        locations = self._catalog.image_locations([image_id for image_id, _ in page]) if page else {}
        hits = []
        for position, (image_id, score) in enumerate(page):
            location = locations.get(image_id)
            if location is None:  # removed between the index snapshot and now
                continue
            hits.append(self._hit(options.offset + position + 1, score, location, presign, options.thumbnails))
        return SearchResult(dataset.name, dataset.model_id, k, hits, truncated, options.offset, autocut_at)

    def _hit(self, rank: int, score: float, location: ImageLocation, presign: bool, thumbnail: bool = False) -> SearchHit:
        return SearchHit(
            rank=rank,
            score=score,
            image_id=location.id,
            key=location.key,
            path=location.source_path or f"s3://{location.bucket}/{location.key}",
            url=self._store.presigned_url(location.key) if presign else None,
            thumbnail=(
                self._store.presigned_url(thumbnail_key(location.key), THUMBNAIL_URL_SECONDS) if thumbnail else None
            ),
        )

    def _filter_selection(self, dataset: Dataset, index: DatasetIndex, image_filter: ImageFilter) -> Selection:
        """Kept for the snapshot's version, read after it existed, less its deleted ids: it admits no deleted image."""
        return self._filter_selections.select(dataset.id, dataset.name, index.index_version, image_filter,
                                              index.deleted_ids)

    def _warm_up(self, encoder: Lazy) -> None:
        """On a cold start, fetches the model and opens its session while the catalog is read."""
        self._cache_listener(ENCODER_CACHE, encoder.ready)
        encoder.start(self._background.get())

    def _prefetch_index(self, dataset: Dataset) -> None:
        """Starts refreshing a stale index while the query is embedded: a cold start then costs the
        slower of (model load, segment load), not their sum. `_index` later waits for it on its lock."""
        cached = self._indexes.get(dataset.name)
        current = cached is not None and cached.is_current(dataset)
        self._cache_listener(INDEX_CACHE, current)
        if not current:
            self._background.get().submit(self._index, dataset)

    def _index(self, dataset: Dataset) -> Snapshot:
        cached = self._cached(dataset)
        if cached is not None:
            return cached
        with self._refresh_lock(dataset.name):
            cached = self._cached(dataset)
            if cached is not None:
                return cached
            previous = self._indexes.get(dataset.name)
            refreshed = self._refresh(dataset, previous if previous and previous.dataset_id == dataset.id else None)
            with self._locks_guard:
                self._indexes[dataset.name] = refreshed
                self._indexes.move_to_end(dataset.name)
                self._evict_beyond_budget(keep=dataset.name)
            return refreshed

    def _load_whole_in_background(self, name: str) -> Future:
        """Starts downloading whole the segments the dataset's snapshot holds in part, unless that runs already;
        a previous attempt's failure is logged and the download started again."""
        with self._locks_guard:
            running = self._whole_load_futures.get(name)
            if running is not None and not running.done():
                return running
            if running is not None and running.exception() is not None:
                logger.error("dataset %s: loading its segments whole failed, trying again: %s", name,
                             running.exception())
            future = self._whole_loads.get().submit(self._load_whole, name)
            self._whole_load_futures[name] = future
            return future

    def _load_whole(self, name: str) -> None:
        with self._locks_guard:
            snapshot = self._indexes.get(name)
        if not isinstance(snapshot, DatasetIndex) or snapshot.complete:
            return
        whole = self._segments.load([loaded.ref for loaded in snapshot.segments if not loaded.complete])
        with self._locks_guard:
            # The snapshot may have been refreshed meanwhile: the newest gets the whole segments it shares.
            latest = self._indexes.get(name)
            if isinstance(latest, DatasetIndex) and latest.dataset_id == snapshot.dataset_id:
                self._indexes[name] = latest.with_loaded(whole)
        logger.info("dataset %s: %d segments loaded whole", name, len(whole))

    def _whole_index(self, dataset: Dataset, index: DatasetIndex) -> DatasetIndex:
        """The snapshot with every segment loaded whole, waiting for the background download (its error raised)."""
        self._load_whole_in_background(dataset.name).result()
        current = self._index(dataset)
        return current if isinstance(current, DatasetIndex) and current.complete else index

    def _cached(self, dataset: Dataset) -> Snapshot | None:
        with self._locks_guard:
            cached = self._indexes.get(dataset.name)
            if cached is None or not cached.is_current(dataset):
                return None
            return cached

    def _mark_searched(self, name: str) -> None:
        """Moves `name` to the most recent end: only requests do, a background refresh finishing late must not."""
        with self._locks_guard:
            if name in self._indexes:
                self._indexes.move_to_end(name)

    def _evict_beyond_budget(self, keep: str) -> None:
        """Drops the least recently searched snapshots until the rest fit the budget (never `keep`, the
        one a request is about to search, even alone over it). Their mapped segments go with the last
        request still holding them."""
        total = sum(index.nbytes for index in self._indexes.values())
        for name in list(self._indexes):
            if total <= self._index_cache_bytes:
                break
            if name != keep:
                total -= self._indexes.pop(name).nbytes
                logger.info("dataset %s: snapshot dropped to stay under %d bytes", name, self._index_cache_bytes)

    @property
    def cached_datasets(self) -> list[str]:
        """Datasets with a snapshot in memory, least recently searched first."""
        with self._locks_guard:
            return list(self._indexes)

    def _refresh(self, dataset: Dataset, previous: Snapshot | None) -> Snapshot:
        dataset, refs, deleted = self._read_index_state(dataset)
        if self._shard_searcher is not None:
            sized = self._segments.sized(refs)
            total = sum(segment.nbytes for segment in sized)
            if total > self._index_cache_bytes:
                try:
                    shards = plan_shards(sized, self._shard_budget_bytes)
                except SegmentOverBudget as error:  # a segment written before compaction capped them
                    logger.error("dataset %s: %s; searching it in this function instead", dataset.name, error)
                else:
                    logger.info("dataset %s: index_version %s, %d segments (%d bytes) over %.0f: %d shards",
                                dataset.name, dataset.index_version, len(refs), total, self._index_cache_bytes,
                                len(shards))
                    return ShardedIndex(dataset.id, dataset.name, dataset.index_version, shards)
        kept = {loaded.ref.id: loaded for loaded in previous.segments} if isinstance(previous, DatasetIndex) else {}
        missing = [ref for ref in refs if ref.id not in kept]
        in_part = (self._partial_load_min_bytes < float("inf") and missing
                   and sum(sized.nbytes for sized in self._segments.sized(missing)) >= self._partial_load_min_bytes)
        loaded = self._segments.load_partial(missing) if in_part else self._segments.load(missing)
        logger.info(
            "dataset %s: index_version %s -> %s, %d segments (%d loaded, %d retired), %d deleted ids",
            dataset.name, previous.index_version if previous else None, dataset.index_version,
            len(refs), len(missing), len(set(kept) - {ref.id for ref in refs}), len(deleted),
        )
        segments = [kept.get(ref.id) or loaded[ref.id] for ref in refs]
        return DatasetIndex.build(dataset, segments, deleted, self._vector_index)

    def _read_index_state(self, dataset: Dataset) -> tuple[Dataset, Sequence[SegmentRef], set[int]]:
        """The live segments and deleted ids as of one `index_version`, with the row of that version.

        They are two reads: a commit between them could pair old segments with newer deleted ids; after
        a compaction those are empty (it retires the segments that held the deleted vectors) while the
        snapshot still searches the old segments. Every catalog change that moves either read bumps
        `index_version`, so an unchanged row after both reads proves they saw one version.
        """
        for _ in range(_CONSISTENT_READ_ATTEMPTS):
            refs = self._catalog.live_segments(dataset.id)
            deleted = self._catalog.deleted_image_ids(dataset.id)
            after = self._catalog.get_dataset(dataset.name)
            if (after.id, after.index_version) == (dataset.id, dataset.index_version):
                return dataset, refs, deleted
            dataset = after
        raise TransientError(f"dataset {dataset.name!r} kept changing while its index was read")

    def _refresh_lock(self, dataset: str) -> threading.Lock:
        with self._locks_guard:
            return self._refresh_locks.setdefault(dataset, threading.Lock())


class ShardSearchService:
    """A shard searcher: answers ShardQuery's with the shard's segments kept loaded between queries.

    Segments are kept least recently used first within `cache_bytes` (a plan's shard fits it, so the
    shard this execution environment serves stays loaded). The dataset's deleted ids are read from the
    catalog once per index_version the queries carry: read after the search function read that version,
    they hold every id deleted by then. Filters are the catalog's matching ids, as in SearchService.
    """

    def __init__(
        self,
        catalog: SearchCatalog,
        store: ObjectStore,
        vector_index: VectorIndex,
        segment_dir: Path,
        cache_bytes: float = float("inf"),
        segment_load_threads: int = 8,
    ) -> None:
        self._catalog = catalog
        self._vector_index = vector_index
        self._segments = SegmentLoader(store, vector_index, segment_dir, segment_load_threads)
        self._cache_bytes = cache_bytes
        self._loaded: OrderedDict[str, LoadedSegment] = OrderedDict()  # least recently searched first
        self._deleted: dict[int, tuple[int, set[int]]] = {}  # dataset id -> (index_version, deleted ids)
        self._views: dict[int, DatasetIndex] = {}  # dataset id -> the last shard searched, ready
        self._lock = threading.Lock()
        self._filter_selections = FilterSelections(catalog, vector_index)

    @property
    def loaded_segments(self) -> list[str]:
        """Ids of the segments held, least recently searched first."""
        with self._lock:
            return list(self._loaded)

    def search(self, query: ShardQuery) -> list[tuple[int, float]]:
        with self._lock:
            view = self._view(query)
        allowed = self._filter_selections.select(query.dataset_id, query.dataset, view.index_version,
                                                 query.image_filter, view.deleted_ids)
        if allowed is False:
            return []
        vector = np.ascontiguousarray(query.vector, dtype=np.float32).reshape(1, -1)
        return view.search(vector, query.k, allowed)

    def _view(self, query: ShardQuery) -> DatasetIndex:
        version, deleted = self._deleted.get(query.dataset_id, (-1, set()))
        if version < query.index_version:
            version, deleted = query.index_version, self._catalog.deleted_image_ids(query.dataset_id)
            self._deleted[query.dataset_id] = (version, deleted)
        wanted = [ref.id for ref in query.segments]
        view = self._views.get(query.dataset_id)
        if view is not None and view.index_version == version and [s.ref.id for s in view.segments] == wanted:
            for segment_id in wanted:
                self._loaded.move_to_end(segment_id)
            return view
        missing = [ref for ref in query.segments if ref.id not in self._loaded]
        self._loaded.update(self._segments.load(missing))
        for segment_id in wanted:
            self._loaded.move_to_end(segment_id)
        self._evict_beyond_budget(keep=set(wanted))
        view = DatasetIndex.of(query.dataset_id, version, [self._loaded[segment_id] for segment_id in wanted],
                               deleted, self._vector_index)
        self._views[query.dataset_id] = view
        return view

    def _evict_beyond_budget(self, keep: set[str]) -> None:
        total = sum(loaded.segment.nbytes for loaded in self._loaded.values())
        for segment_id in list(self._loaded):
            if total <= self._cache_bytes:
                break
            if segment_id not in keep:
                total -= self._loaded.pop(segment_id).segment.nbytes
                self._views = {dataset_id: view for dataset_id, view in self._views.items()
                               if all(loaded.ref.id != segment_id for loaded in view.segments)}
                logger.info("segment %s dropped to stay under %d bytes", segment_id, self._cache_bytes)


def _ignore_cache_lookup(cache: str, hit: bool) -> None:
    """The listener until one is given."""


def largest_gap_cut(scores: Sequence[float]) -> int:
    """How many of the descending `scores` come before the largest drop between two neighbours (all of
    them when there are fewer than three: one gap says nothing about where relevance ends)."""
    if len(scores) < 3:
        return len(scores)
    gaps = [scores[position] - scores[position + 1] for position in range(len(scores) - 1)]
    return gaps.index(max(gaps)) + 1


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise InvalidRequest(f"k must be between 1 and {MAX_K}, got {k}")
