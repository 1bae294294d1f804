"""The ports the use cases talk through; adapters in `clipsearch.adapters` implement them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

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
class DatasetSummary:
    dataset: Dataset
    counts: Mapping[str, int]  # by image status, every status present
    recent_failures: Sequence[ImageFailure] = ()


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
    """The catalog as the search and dataset functions read it."""

    def get_dataset(self, name: str) -> Dataset: ...  # raises DatasetNotFound

    def list_datasets(self) -> Sequence[DatasetSummary]: ...

    def summarize_dataset(self, name: str, failure_limit: int = 20) -> DatasetSummary: ...

    def live_segments(self, dataset_id: int) -> Sequence[SegmentRef]: ...

    def deleted_image_ids(self, dataset_id: int) -> set[int]:
        """Ids of deleted images whose vectors may still sit in live segments."""
        ...

    def image_locations(self, ids: Sequence[int]) -> Mapping[int, ImageLocation]: ...

    def remove_dataset(self, name: str) -> DatasetRemoval: ...  # raises DatasetNotFound
