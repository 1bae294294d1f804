"""The ports the use cases talk through; adapters in `clipsearch.adapters` implement them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np

from clipsearch.errors import InvalidImage
from clipsearch.search_results import ImageFilter
from clipsearch.segments import IndexSpec, SegmentVectors

IMAGE_STATUSES = ("pending", "indexed", "failed", "deleted")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    etag: str
    size: int
    last_modified: datetime | None = None


@dataclass(frozen=True)
class StoredObject:
    key: str
    etag: str
    data: bytes
    metadata: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None


class ObjectStore(Protocol):
    """One bucket. Raises ObjectNotFound for a missing key and TransientError for retryable failures."""

    bucket: str

    def get(self, key: str) -> StoredObject: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def put(
        self,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str: ...

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object; TransientError when it holds fewer."""
        ...

    def download_file(self, key: str, destination: Path) -> None: ...

    def delete_many(self, keys: Iterable[str]) -> None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def presigned_url(self, key: str, expires_seconds: int = 3600) -> str: ...


@dataclass(frozen=True)
class Dataset:
    id: int
    name: str
    model_id: str
    index_version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ImageFailure:
    key: str
    reason: str
    failed_at: datetime


@dataclass(frozen=True)
class DeletionProgress:
    """A dataset being deleted: when it was asked, and what its worker has removed so far."""

    requested_at: datetime
    objects_deleted: int  # bucket objects (images, thumbnails, segments) removed so far
    rows_deleted: int  # catalog image rows removed so far
    progress_at: datetime | None  # the last page a worker finished; None before the first


@dataclass(frozen=True)
class DeletionTask:
    """One dataset's deletion, by id: a stale task never touches a new dataset of the same name."""

    dataset: str
    dataset_id: int


@dataclass(frozen=True)
class DatasetSummary:
    dataset: Dataset
    counts: Mapping[str, int]  # by image status, every status present
    recent_failures: Sequence[ImageFailure] = ()
    deletion: DeletionProgress | None = None  # set while the dataset is being deleted


@dataclass(frozen=True)
class SegmentRef:
    id: str
    object_key: str
    vector_count: int
    index_type: str


@dataclass(frozen=True)
class ImageLocation:
    id: int
    bucket: str
    key: str
    source_path: str | None


@dataclass(frozen=True)
class DatasetRemoval:
    """What deleting a dataset's catalog rows leaves to remove from the bucket."""

    dataset: str
    image_keys: Sequence[str]
    segment_keys: Sequence[str]


class SearchCatalog(Protocol):
    """The catalog as the search and dataset functions read it.

    Methods taking a dataset name raise InvalidDatasetName for a name that breaks the rule, and
    DatasetNotFound for one that does not exist.
    """

    def get_dataset(self, name: str) -> Dataset: ...

    def list_datasets(self) -> Sequence[DatasetSummary]: ...

    def summarize_dataset(self, name: str, failure_limit: int = 20) -> DatasetSummary: ...

    def live_segments(self, dataset_id: int) -> Sequence[SegmentRef]: ...

    def deleted_image_ids(self, dataset_id: int) -> set[int]:
        """Ids of deleted images whose vectors may still sit in live segments."""
        ...

    def image_locations(self, ids: Sequence[int]) -> Mapping[int, ImageLocation]:
        """Where the indexed images among `ids` live; ids of images no longer indexed are left out."""
        ...

    def remove_dataset(self, name: str) -> DatasetRemoval: ...  # raises DatasetNotFound

    # --- asynchronous deletion: get_dataset raises DatasetDeleting from the request on ---

    def request_deletion(self, name: str, create_missing: bool = False) -> tuple[DeletionTask, DeletionProgress]:
        """Marks the dataset deleting (again: unchanged); with `create_missing`, a dataset the catalog never
        recorded gets a row only to track the deletion of its objects. Raises DatasetNotFound otherwise."""
        ...

    def claim_deletion(self, dataset_id: int, lease_seconds: int) -> datetime | None:
        """Takes the deletion's lease and returns when the deletion was asked for; None when the dataset is
        gone, not deleting, or another worker's lease has not run out."""
        ...

    def record_deletion_progress(self, dataset_id: int, objects: int, rows: int, lease_seconds: int) -> None:
        """Adds a finished page to the counts and renews the lease."""
        ...

    def release_deletion(self, dataset_id: int) -> None:
        """Gives the lease up, so the task's next message resumes at once."""
        ...

    def delete_image_rows(self, dataset_id: int, limit: int) -> int:
        """Removes up to `limit` image rows of a deleting dataset; returns how many."""
        ...

    def stalled_deletions(self, requested_before: datetime) -> Sequence[DeletionTask]:
        """Deleting datasets asked before `requested_before` whose lease is free: their worker died or
        their message was lost."""
        ...

    def filtered_image_ids(
        self, dataset_id: int, key_prefix: str | None, since: datetime | None, until: datetime | None
    ) -> np.ndarray:
        """Ids (int64, each once, in no particular order) of the indexed images whose key starts with `key_prefix`
        (any key when None) and that were ingested in [since, until). The answer may also hold ids of images
        deleted since their segment was written, whose vectors may still sit in live segments: the caller removes
        them with the `deleted_image_ids` of its snapshot (a catalog may keep a folder's ids per segment, not per
        image)."""
        ...


# --- ingestion side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInput:
    """One image to embed, as bytes or a file path, named for error messages; `thumbnail_side` asks for a
    WebP thumbnail of that longest side made from the same decoded image."""

    name: str
    data: bytes | Path
    thumbnail_side: int | None = None


class EmbeddedImage(Protocol):
    vector: np.ndarray  # float32 [embedding_dim], L2-normalized
    width: int
    height: int
    thumbnail: bytes | None  # WebP, when the input asked for one and it could be made


class ImageEncoder(Protocol):
    """Embeds images together; an undecodable image comes back as an InvalidImage, not raised."""

    def embed_images(self, items: Sequence[ImageInput]) -> list[EmbeddedImage | InvalidImage]: ...


class MessageQueue(Protocol):
    """The ingestion queue: reconciliation feeds it S3-notification-shaped messages."""

    def send(self, bodies: Sequence[str]) -> None: ...


@dataclass(frozen=True)
class RetryBackoff:
    """How long a message handed back for a transient failure stays hidden before its next delivery.

    Grows `factor` times with each receive from `first_seconds`, up to `cap_seconds`: 15, 60, 240, 900 s by
    default, so a batch that failed during a short outage comes back within a minute, not after the queue's
    own visibility timeout (six function timeouts), while the four retries before the fifth receive
    dead-letters a message still span about 20 minutes of a longer outage.
    """

    first_seconds: int = 15
    factor: int = 4
    cap_seconds: int = 900

    def delay_seconds(self, receive_count: int) -> int:
        return min(self.cap_seconds, self.first_seconds * self.factor ** max(0, receive_count - 1))


@dataclass(frozen=True)
class PostponedMessage:
    """A delivered message to hand back after `delay_seconds`; `receipt` is the delivery's own handle."""

    receipt: str
    delay_seconds: int


class MessageVisibility(Protocol):
    """Shortens or lengthens how long delivered messages of `source` (the queue that sent them) stay hidden.

    Raises TransientError when the queue refuses; callers treat that as a lost optimisation, not a failure.
    """

    def postpone(self, source: str, messages: Sequence[PostponedMessage]) -> None: ...


@dataclass(frozen=True)
class NewImage:
    """An object fetched from the bucket, about to be claimed for embedding."""

    bucket: str
    key: str
    etag: str
    source_path: str | None
    sha256: str | None  # None for an object refused unread (over the size limit)
    byte_size: int


@dataclass(frozen=True)
class ClaimedImage:
    """A pending image row: its id becomes the FAISS vector id."""

    id: int
    key: str
    etag: str
    attempts: int


@dataclass(frozen=True)
class IndexedImage:
    id: int
    width: int
    height: int


@dataclass(frozen=True)
class FailedImage:
    id: int
    reason: str


@dataclass(frozen=True)
class NewSegment:
    id: str
    object_key: str
    vector_count: int
    index_type: str


@dataclass(frozen=True)
class BatchCommit:
    """The outcome of committing a batch.

    `stale_ids` non-empty means the batch's segment was not registered: those images were settled by
    a concurrent batch, or carry content older than their key's live row; commit again without them.
    """

    index_version: int | None
    stale_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class LiveImage:
    id: int
    key: str
    etag: str
    status: str


class Catalog(SearchCatalog, Protocol):
    """The catalog as ingestion, compaction and reconciliation write it."""

    def ensure_dataset(self, name: str, model_id: str) -> Dataset: ...  # raises ModelMismatch

    def claim_images(self, dataset_id: int, images: Sequence[NewImage]) -> list[ClaimedImage | None]:
        """A pending row per image (reused after a crash), or None where that version is already live."""
        ...

    def commit_batch(
        self,
        dataset_id: int,
        segment: NewSegment | None,
        indexed: Sequence[IndexedImage],
        failed: Sequence[FailedImage],
    ) -> BatchCommit: ...

    def remove_images(self, dataset: str, key: str, keep_etag: str | None) -> int:
        """Marks deleted the live rows of `key` (except the version `keep_etag`); returns how many."""
        ...

    def remove_image_ids(self, dataset_id: int, ids: Sequence[int]) -> int: ...

    def live_images(self, dataset: str) -> Mapping[str, LiveImage]: ...  # by key; pending included

    def segment_members(self, dataset_id: int) -> Mapping[int, str]:
        """Indexed image id -> the one segment whose copy of its vector counts."""
        ...

    def publish_compaction(
        self, dataset_id: int, merged: NewSegment, replaced: Sequence[str], kept_ids: Sequence[int]
    ) -> int | None:
        """Swaps `replaced` for `merged` under the dataset's lock; None if another compaction won or the
        dataset is being deleted (the caller then deletes its merged object)."""
        ...

    def retired_segments(self, dataset_id: int, retired_before: datetime) -> Sequence[SegmentRef]: ...

    def forget_segments(self, ids: Sequence[str]) -> None: ...

    def segment_keys(self, dataset_id: int) -> set[str]: ...


# --- vector index -----------------------------------------------------------------------------------


class IdSelection(Protocol):
    """The ids a search may return (only these, or every id but these), in the form the VectorIndex that
    made it searches through (opaque here)."""


class SegmentSearcher(Protocol):
    """A loaded segment: the image ids it holds, top-k and range inner-product searches over them."""

    ids: np.ndarray  # int64 [n]
    nbytes: int  # what the loaded segment occupies (file size; memory-mapped pages count once)

    def __len__(self) -> int: ...

    def search(
        self, query: np.ndarray, k: int, selection: IdSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the k nearest vectors to `query` ([1, dim]) among the ids `selection` admits
        (all when None), best first; fewer when fewer remain."""
        ...

    def range_search(
        self, queries: np.ndarray, min_score: float, selection: IdSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each query row, the admitted vectors scoring at least `min_score`: (limits [n + 1], scores,
        ids), row i's matches at limits[i]:limits[i + 1]."""
        ...

    def vectors(self) -> np.ndarray:
        """Every stored vector, in the order of `ids` (decoded: approximate for compressed kinds)."""
        ...


class VectorIndex(Protocol):
    """Builds segments of an IndexSpec, loads them (from bytes, or memory-mapped from a file), reads back
    their vectors for merging, and makes the id selections its searches take."""

    def build(self, content: SegmentVectors, spec: IndexSpec) -> bytes: ...

    def write(self, content: SegmentVectors, spec: IndexSpec, destination: Path) -> int: ...

    def load(self, data: bytes) -> SegmentSearcher: ...

    def open(self, path: Path) -> SegmentSearcher: ...

    def open_partial(self, read_range: Callable[[int, int], bytes], size: int) -> SegmentSearcher | None:
        """A segment of `size` bytes read through `read_range(start, end)` as searches need it (its header
        now, the parts a query probes when it runs), answering as the whole segment would; None when its
        format cannot be read in parts (it must then be opened whole)."""
        ...

    def read_vectors(self, data: bytes | Path) -> SegmentVectors: ...

    def exclusion(self, excluded_ids: np.ndarray) -> IdSelection:
        """Every id but `excluded_ids`."""
        ...

    def selection(self, allowed_ids: np.ndarray) -> IdSelection:
        """Only `allowed_ids`."""
        ...


# --- fan-out ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardQuery:
    """What a shard searcher is asked: the top `k` live images of `segments` (one shard of the dataset as of
    `index_version`) for `vector`, among those `image_filter` admits."""

    dataset: str
    dataset_id: int
    index_version: int
    shard: int  # its number in the plan: a searcher may keep each shard on its own warm instances
    segments: tuple[SegmentRef, ...]
    vector: np.ndarray  # float32 [embedding_dim], L2-normalized
    k: int
    image_filter: ImageFilter = field(default_factory=ImageFilter)


class ShardSearcher(Protocol):
    """Searches one shard somewhere else (another function). Raises TransientError when it cannot answer."""

    def search_shard(self, query: ShardQuery) -> list[tuple[int, float]]:
        """(image id, score) pairs, best first, ties by id: the shard's top k with deleted ids excluded."""
        ...
