"""The search use case: embed a query, search the dataset's cached segments, return the top hits with paths.

Warm caches live for the execution environment: the encoders (built lazily, text and vision apart, so
a text query never loads the vision graph) and, per dataset, an immutable snapshot of its loaded
segments and deleted ids. Each request reads the dataset row once; when `index_version` moved, only
new segments are fetched (in parallel), retired ones are dropped and the deleted ids re-read.
Snapshots are swapped whole, so concurrent requests never see a half-refreshed index.

Deleted ids are excluded inside FAISS (an id selector), so a query costs the same however many
vectors await compaction; filters (key prefix, ingest time) are id selectors too, built from the
catalog's matching ids, so a filtered page holds k hits without fetching more and dropping.
Pages are cut from one ranking ordered by (score, id), the same for every page while the dataset does
not change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import faiss
import numpy as np

from clipsearch.datasets import check_caller_image_key
from clipsearch.errors import (
    DatasetNotFound,
    ImageTooLarge,
    InvalidRequest,
    ModelMismatch,
    ObjectNotFound,
    TransientError,
)
from clipsearch.ports import Dataset, ObjectStore, SearchCatalog, SegmentRef
from clipsearch.datasets import dataset_prefix
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
from clipsearch.segments import load_segment
from clipsearch.thumbnails import thumbnail_key

logger = logging.getLogger(__name__)

# How often the live segments and deleted ids are read again when a commit lands between the reads.
_CONSISTENT_READ_ATTEMPTS = 5
# Finding duplicates compares every vector with every other: 20k x 20k x 512 is ~2e11 multiply-adds,
# a few seconds on two cores. Beyond that it needs an approximate pass (not built).
MAX_DUPLICATE_SCAN = 20_000
# A page shows its thumbnails at once; a short expiry limits what a copied URL gives away.
THUMBNAIL_URL_SECONDS = 900


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


class FaissSegment:
    """A loaded segment (flat or HNSW, as it was built): its vector ids and a top-k inner-product search."""

    def __init__(self, index: faiss.Index) -> None:
        self._index = index
        self.ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        inner = faiss.downcast_index(index.index)
        # Search parameters replace the index's own, so a filtered HNSW search must repeat its depth.
        self._ef_search = inner.hnsw.efSearch if isinstance(inner, faiss.IndexHNSW) else None

    @classmethod
    def load(cls, data: bytes) -> FaissSegment:
        return cls(load_segment(data))

    def search(
        self, query: np.ndarray, k: int, allowed: faiss.IDSelector | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the k nearest vectors to `query` ([1, dim]) among the ids `allowed` selects
        (all when None), best first; fewer when fewer are allowed."""
        k = min(k, self._index.ntotal)
        if k == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        scores, ids = self._index.search(query, k, params=self._parameters(allowed))
        found = ids[0] >= 0
        return scores[0][found], ids[0][found]

    def vectors(self) -> np.ndarray:
        """Every stored vector, in the order of `ids`."""
        return self._index.index.reconstruct_n(0, self._index.ntotal)

    def range_search(
        self, queries: np.ndarray, min_score: float, allowed: faiss.IDSelector | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each query row, the vectors scoring at least `min_score`: FAISS's (limits, scores, ids)."""
        return self._index.range_search(queries, min_score, params=self._parameters(allowed))

    def _parameters(self, allowed: faiss.IDSelector | None) -> faiss.SearchParameters | None:
        if allowed is None:
            return None
        # Built per call: IndexIDMap swaps the selector inside the parameters while it searches.
        if self._ef_search is None:
            return faiss.SearchParameters(sel=allowed)
        return faiss.SearchParametersHNSW(sel=allowed, efSearch=self._ef_search)


T = TypeVar("T")


class Lazy(Generic[T]):
    """Builds a value on first use, once, even when concurrent requests ask for it together."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._value is not None

    def get(self) -> T:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._build()
        return self._value


@dataclass(frozen=True)
class LoadedSegment:
    ref: SegmentRef
    segment: FaissSegment


@dataclass(frozen=True)
class DatasetIndex:
    """One dataset's segments as of `index_version`, with the deleted ids each segment still holds."""

    dataset_id: int
    index_version: int
    segments: tuple[LoadedSegment, ...]
    deleted_per_segment: tuple[int, ...]
    live: faiss.IDSelector | None  # every id but the deleted ones; None when nothing is deleted

    @classmethod
    def build(
        cls, dataset: Dataset, segments: Sequence[LoadedSegment], deleted_ids: set[int]
    ) -> DatasetIndex:
        deleted = np.array(sorted(deleted_ids), dtype=np.int64)
        return cls(
            dataset_id=dataset.id,
            index_version=dataset.index_version,
            segments=tuple(segments),
            deleted_per_segment=tuple(
                int(np.isin(loaded.segment.ids, deleted, assume_unique=True).sum()) for loaded in segments
            ),
            live=faiss.IDSelectorNot(faiss.IDSelectorBatch(deleted)) if len(deleted) else None,
        )

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids and vectors of every live image, each once."""
        id_parts, vector_parts = [], []
        for loaded, deleted_count in zip(self.segments, self.deleted_per_segment):
            ids, vectors = loaded.segment.ids, loaded.segment.vectors()
            if deleted_count:
                keep = np.array([self.live.is_member(int(image_id)) for image_id in ids], dtype=bool)
                ids, vectors = ids[keep], vectors[keep]
            id_parts.append(ids)
            vector_parts.append(vectors)
        if not id_parts:
            return np.empty(0, np.int64), np.empty((0, 0), np.float32)
        ids, first = np.unique(np.concatenate(id_parts), return_index=True)
        return ids, np.ascontiguousarray(np.concatenate(vector_parts)[first])

    def is_current(self, dataset: Dataset) -> bool:
        """True when this snapshot is at least as new as the row a request read (a refresh may have
        read a newer version than the row that asked for it)."""
        return self.dataset_id == dataset.id and self.index_version >= dataset.index_version

    def search(
        self, vector: np.ndarray, k: int, allowed: faiss.IDSelector | None = None
    ) -> list[tuple[int, float]]:
        """The k best live (image id, score) pairs, ties broken by id: a segment holding deleted vectors
        searches through the live-id selector (the others without, which is faster); `allowed`, holding
        only live ids, replaces it in every segment; an id found in two segments counts once."""
        candidates: list[tuple[float, int]] = []
        for loaded, deleted_count in zip(self.segments, self.deleted_per_segment):
            selector = allowed if allowed is not None else (self.live if deleted_count else None)
            scores, ids = loaded.segment.search(vector, k, selector)
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


class SearchService:
    """Text and image search over one model's datasets, with caches kept warm between requests."""

    def __init__(
        self,
        catalog: SearchCatalog,
        store: ObjectStore,
        model_id: str,
        text_encoder: Callable[[], TextQueryEncoder],
        image_encoder: Callable[[], ImageQueryEncoder],
        max_image_bytes: int,
        segment_load_threads: int = 8,
    ) -> None:
        self._catalog = catalog
        self._store = store
        self.model_id = model_id
        self._text_encoder = Lazy(text_encoder)
        self._image_encoder = Lazy(image_encoder)
        self._max_image_bytes = max_image_bytes
        self._segment_load_threads = segment_load_threads
        self._background = Lazy(lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="warm-up"))
        self._indexes: dict[str, DatasetIndex] = {}
        self._refresh_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._cache_listener: CacheListener = _ignore_cache_lookup

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
        self._warm_up(self._text_encoder)
        row = self._dataset(dataset)
        self._prefetch_index(row)
        embedding = self._text_encoder.get().embed_text(query)
        return self._search(row, embedding.vector, k, presign, options, truncated=embedding.truncated)

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
        stored = sum(len(loaded.segment.ids) for loaded in index.segments)
        if stored > MAX_DUPLICATE_SCAN:  # refused before any vector is copied out of the index
            raise InvalidRequest(
                f"dataset {dataset!r} has {stored} vectors; finding duplicates scans at most {MAX_DUPLICATE_SCAN}"
            )
        ids, vectors = index.live_vectors()
        links: dict[tuple[int, int], float] = {}
        if len(ids):
            for loaded, deleted_count in zip(index.segments, index.deleted_per_segment):
                limits, scores, found = loaded.segment.range_search(
                    vectors, min_score, index.live if deleted_count else None
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
        allowed = self._filter_selector(dataset, options.image_filter)
        ranked: list[tuple[int, float]] = []
        if allowed is not False:
            with _one_faiss_thread():
                ranked = index.search(query, options.offset + k, allowed)
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

    def _hit(self, rank: int, score: float, location, presign: bool, thumbnail: bool = False) -> SearchHit:
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

    def _filter_selector(self, dataset: Dataset, image_filter: ImageFilter) -> faiss.IDSelector | None | bool:
        """None without a filter; False when no image matches; else a selector of the matching (live) ids."""
        if not image_filter.active:
            return None
        key_prefix = dataset_prefix(dataset.name) + (image_filter.key_prefix or "")
        ids = self._catalog.filtered_image_ids(dataset.id, key_prefix, image_filter.since, image_filter.until)
        if not ids:
            return False
        return faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))

    def _warm_up(self, encoder: Lazy) -> None:
        """On a cold start, fetches the model and opens its session while the catalog is read."""
        self._cache_listener(ENCODER_CACHE, encoder.ready)
        if not encoder.ready:
            self._background.get().submit(encoder.get)

    def _prefetch_index(self, dataset: Dataset) -> None:
        """Starts refreshing a stale index while the query is embedded: a cold start then costs the
        slower of (model load, segment load), not their sum. `_index` later waits for it on its lock."""
        cached = self._indexes.get(dataset.name)
        current = cached is not None and cached.is_current(dataset)
        self._cache_listener(INDEX_CACHE, current)
        if not current:
            self._background.get().submit(self._index, dataset)

    def _index(self, dataset: Dataset) -> DatasetIndex:
        cached = self._indexes.get(dataset.name)
        if cached is not None and cached.is_current(dataset):
            return cached
        with self._refresh_lock(dataset.name):
            cached = self._indexes.get(dataset.name)
            if cached is not None and cached.is_current(dataset):
                return cached
            refreshed = self._refresh(dataset, cached if cached and cached.dataset_id == dataset.id else None)
            self._indexes[dataset.name] = refreshed
            return refreshed

    def _refresh(self, dataset: Dataset, previous: DatasetIndex | None) -> DatasetIndex:
        dataset, refs, deleted = self._read_index_state(dataset)
        kept = {loaded.ref.id: loaded for loaded in previous.segments} if previous else {}
        missing = [ref for ref in refs if ref.id not in kept]
        loaded = self._load_segments(missing)
        logger.info(
            "dataset %s: index_version %s -> %s, %d segments (%d loaded, %d retired), %d deleted ids",
            dataset.name, previous.index_version if previous else None, dataset.index_version,
            len(refs), len(missing), len(set(kept) - {ref.id for ref in refs}), len(deleted),
        )
        segments = [kept.get(ref.id) or loaded[ref.id] for ref in refs]
        return DatasetIndex.build(dataset, segments, deleted)

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

    def _load_segments(self, refs: Sequence[SegmentRef]) -> Mapping[str, LoadedSegment]:
        def load(ref: SegmentRef) -> LoadedSegment:
            try:
                data = self._store.get(ref.object_key).data
            except ObjectNotFound as error:
                # Retired by a compaction between reading the catalog and fetching: the next try sees it.
                raise TransientError(f"segment {ref.object_key} disappeared while loading") from error
            return LoadedSegment(ref, FaissSegment.load(data))

        if len(refs) <= 1:
            return {ref.id: load(ref) for ref in refs}
        with ThreadPoolExecutor(max_workers=min(self._segment_load_threads, len(refs))) as pool:
            return {loaded.ref.id: loaded for loaded in pool.map(load, refs)}

    def _refresh_lock(self, dataset: str) -> threading.Lock:
        with self._locks_guard:
            return self._refresh_locks.setdefault(dataset, threading.Lock())


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
