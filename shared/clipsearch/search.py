"""The search use case: embed a query, search the dataset's cached segments, return the top hits with paths.

Warm caches live for the execution environment: the encoders (built lazily, text and vision apart, so
a text query never loads the vision graph) and, per dataset, an immutable snapshot of its loaded
segments and deleted ids. Each request reads the dataset row once; when `index_version` moved, only
new segments are fetched (in parallel), retired ones are dropped and the deleted ids re-read.
Snapshots are swapped whole, so concurrent requests never see a half-refreshed index.

Deleted ids are excluded inside the index (an id exclusion), so a query costs the same however many
vectors await compaction. Segments are fetched into a scratch directory and opened memory-mapped, so a
loaded segment costs about its file size once; the snapshots together stay under a byte budget, the
least recently searched dataset dropped first.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

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
from clipsearch.ports import (
    Dataset,
    IdExclusion,
    ObjectStore,
    SearchCatalog,
    SegmentRef,
    SegmentSearcher,
    VectorIndex,
)
from clipsearch.search_results import DEFAULT_K, MAX_K, SearchHit, SearchResult

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
    segment: SegmentSearcher


@dataclass(frozen=True)
class DatasetIndex:
    """One dataset's segments as of `index_version`, with the deleted ids each segment still holds."""

    dataset_id: int
    index_version: int
    segments: tuple[LoadedSegment, ...]
    deleted_per_segment: tuple[int, ...]
    excluded: IdExclusion | None  # the deleted ids; None when nothing is deleted

    @classmethod
    def build(
        cls, dataset: Dataset, segments: Sequence[LoadedSegment], deleted_ids: set[int], vector_index: VectorIndex
    ) -> DatasetIndex:
        deleted = np.array(sorted(deleted_ids), dtype=np.int64)
        return cls(
            dataset_id=dataset.id,
            index_version=dataset.index_version,
            segments=tuple(segments),
            deleted_per_segment=tuple(
                int(np.isin(loaded.segment.ids, deleted, assume_unique=True).sum()) for loaded in segments
            ),
            excluded=vector_index.exclusion(deleted) if len(deleted) else None,
        )

    @property
    def nbytes(self) -> int:
        return sum(loaded.segment.nbytes for loaded in self.segments)

    def is_current(self, dataset: Dataset) -> bool:
        """True when this snapshot is at least as new as the row a request read (a refresh may have
        read a newer version than the row that asked for it)."""
        return self.dataset_id == dataset.id and self.index_version >= dataset.index_version

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k best live (image id, score) pairs: a segment holding deleted vectors searches through
        the exclusion (the others without, which is faster); an id found in two segments counts once."""
        candidates: list[tuple[float, int]] = []
        for loaded, deleted_count in zip(self.segments, self.deleted_per_segment):
            scores, ids = loaded.segment.search(vector, k, self.excluded if deleted_count else None)
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
        vector_index: VectorIndex,
        segment_dir: Path,
        index_cache_bytes: float = float("inf"),
        segment_load_threads: int = 8,
    ) -> None:
        self._catalog = catalog
        self._store = store
        self._vector_index = vector_index
        self._segment_dir = segment_dir
        self._index_cache_bytes = index_cache_bytes
        self.model_id = model_id
        self._text_encoder = Lazy(text_encoder)
        self._image_encoder = Lazy(image_encoder)
        self._max_image_bytes = max_image_bytes
        self._segment_load_threads = segment_load_threads
        self._background = Lazy(lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="warm-up"))
        self._indexes: OrderedDict[str, DatasetIndex] = OrderedDict()  # least recently searched first
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
        self._mark_searched(dataset.name)
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

    def _cached(self, dataset: Dataset) -> DatasetIndex | None:
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

    def _load_segments(self, refs: Sequence[SegmentRef]) -> Mapping[str, LoadedSegment]:
        def load(ref: SegmentRef) -> LoadedSegment:
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

        if len(refs) <= 1:
            return {ref.id: load(ref) for ref in refs}
        with ThreadPoolExecutor(max_workers=min(self._segment_load_threads, len(refs))) as pool:
            return {loaded.ref.id: loaded for loaded in pool.map(load, refs)}

    def _refresh_lock(self, dataset: str) -> threading.Lock:
        with self._locks_guard:
            return self._refresh_locks.setdefault(dataset, threading.Lock())


def _ignore_cache_lookup(cache: str, hit: bool) -> None:
    """The listener until one is given."""


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise InvalidRequest(f"k must be between 1 and {MAX_K}, got {k}")
