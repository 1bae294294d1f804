"""The search use case: embed a query, search the dataset's cached segments, return the top hits with paths.

Warm caches live for the execution environment: the encoders (built lazily, text and vision apart, so
a text query never loads the vision graph) and, per dataset, an immutable snapshot of its loaded
segments and deleted ids. Each request reads the dataset row once; when `index_version` moved, only
new segments are fetched (in parallel), retired ones are dropped and the deleted ids re-read.
Snapshots are swapped whole, so concurrent requests never see a half-refreshed index.

Deleted ids are excluded inside FAISS (an id selector), so a query costs the same however many
vectors await compaction.
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
from clipsearch.search_results import DEFAULT_K, MAX_K, SearchHit, SearchResult
from clipsearch.segments import load_segment

logger = logging.getLogger(__name__)

# How often the live segments and deleted ids are read again when a commit lands between the reads.
_CONSISTENT_READ_ATTEMPTS = 5


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
        params = None
        if allowed is not None:
            # Built per call: IndexIDMap swaps the selector inside the parameters while it searches.
            if self._ef_search is None:
                params = faiss.SearchParameters(sel=allowed)
            else:
                params = faiss.SearchParametersHNSW(sel=allowed, efSearch=self._ef_search)
        scores, ids = self._index.search(query, k, params=params)
        found = ids[0] >= 0
        return scores[0][found], ids[0][found]


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

    def is_current(self, dataset: Dataset) -> bool:
        """True when this snapshot is at least as new as the row a request read (a refresh may have
        read a newer version than the row that asked for it)."""
        return self.dataset_id == dataset.id and self.index_version >= dataset.index_version

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k best live (image id, score) pairs: a segment holding deleted vectors searches through
        the live-id selector (the others without, which is faster); an id found in two segments counts once."""
        candidates: list[tuple[float, int]] = []
        for loaded, deleted_count in zip(self.segments, self.deleted_per_segment):
            scores, ids = loaded.segment.search(vector, k, self.live if deleted_count else None)
            candidates.extend(zip(scores.tolist(), ids.tolist()))
        candidates.sort(key=lambda candidate: -candidate[0])
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

    def search_text(self, dataset: str, query: str, k: int = DEFAULT_K, presign: bool = False) -> SearchResult:
        _check_k(k)
        if not query.strip():
            raise InvalidRequest("query is empty")
        self._warm_up(self._text_encoder)
        row = self._dataset(dataset)
        self._prefetch_index(row)
        embedding = self._text_encoder.get().embed_text(query)
        return self._search(row, embedding.vector, k, presign, truncated=embedding.truncated)

    def search_image(
        self, dataset: str, image: bytes, name: str = "query image", k: int = DEFAULT_K, presign: bool = False
    ) -> SearchResult:
        _check_k(k)
        self._check_size(name, len(image))
        if not image:
            raise InvalidRequest("the image is empty")
        self._warm_up(self._image_encoder)
        row = self._dataset(dataset)
        self._prefetch_index(row)
        embedding = self._image_encoder.get().embed_image(image, name)
        return self._search(row, embedding.vector, k, presign)

    def search_stored_image(
        self, dataset: str, key: str, k: int = DEFAULT_K, presign: bool = False
    ) -> SearchResult:
        """Query by an image already in the bucket, under datasets/<dataset>/ (missing -> ObjectNotFound),
        within the request byte limit (checked on its size before it is fetched)."""
        _check_k(k)
        check_caller_image_key(dataset, key)
        self._warm_up(self._image_encoder)
        row = self._dataset(dataset)
        self._prefetch_index(row)
        info = self._store.head(key)
        if info is None:
            raise ObjectNotFound(key)
        self._check_size(key, info.size)
        image = self._store.get(key)
        self._check_size(key, len(image.data))  # replaced by a larger object since the head
        embedding = self._image_encoder.get().embed_image(image.data, key)
        return self._search(row, embedding.vector, k, presign)

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
        self, dataset: Dataset, vector: np.ndarray, k: int, presign: bool, truncated: bool = False
    ) -> SearchResult:
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        index = self._index(dataset)
        with _one_faiss_thread():
            ranked = index.search(query, k)
        locations = self._catalog.image_locations([image_id for image_id, _ in ranked]) if ranked else {}
        hits = []
        for image_id, score in ranked:
            location = locations.get(image_id)
            if location is None:  # removed between the index snapshot and now
                continue
            hits.append(
                SearchHit(
                    rank=len(hits) + 1,
                    score=score,
                    image_id=image_id,
                    key=location.key,
                    path=location.source_path or f"s3://{location.bucket}/{location.key}",
                    url=self._store.presigned_url(location.key) if presign else None,
                )
            )
        return SearchResult(dataset.name, dataset.model_id, k, hits, truncated)

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


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise InvalidRequest(f"k must be between 1 and {MAX_K}, got {k}")
