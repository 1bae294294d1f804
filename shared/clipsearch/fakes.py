"""In-memory fakes of the ports, typed against them, for a fast unit tier of the search and compaction logic.

They keep the contracts the real adapters keep (missing keys raise ObjectNotFound, segments round-trip
their ids, searches come back best first) and nothing else: exact search, no persistence.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import numpy as np

from clipsearch.errors import DatasetDeleting, DatasetNotFound, ObjectNotFound, TransientError
from clipsearch.ports import (
    Dataset,
    DatasetRemoval,
    DatasetSummary,
    DeletionProgress,
    DeletionTask,
    IdSelection,
    ImageLocation,
    NewSegment,
    ObjectInfo,
    SegmentRef,
    ShardQuery,
    StoredObject,
)
from clipsearch.segments import IndexSpec, SegmentVectors
from clipsearch.shards import query_from_payload, query_payload, ranking_from_payload, ranking_payload


@dataclass(frozen=True)
class SelectedIds:
    ids: np.ndarray  # int64, sorted
    exclude: bool  # every id but `ids` when True, only `ids` when False

    def admits(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, self.ids) != self.exclude


class InMemorySegment:
    """A segment searched exactly with NumPy."""

    def __init__(self, content: SegmentVectors, nbytes: int) -> None:
        self.ids = content.ids
        self._vectors = content.vectors
        self.nbytes = nbytes

    def __len__(self) -> int:
        return len(self.ids)

    def search(
        self, query: np.ndarray, k: int, selection: IdSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = self._vectors @ np.asarray(query, np.float32).reshape(-1)
        candidates = np.flatnonzero(self._admitted(selection))
        order = candidates[np.argsort(-scores[candidates], kind="stable")][:k]
        return scores[order].astype(np.float32), self.ids[order]

    def range_search(
        self, queries: np.ndarray, min_score: float, selection: IdSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        admitted = self._admitted(selection)
        limits, scores, ids = [0], [], []
        for row in np.asarray(queries, np.float32).reshape(len(queries), -1):
            row_scores = self._vectors @ row
            found = np.flatnonzero(admitted & (row_scores >= min_score))
            scores.append(row_scores[found])
            ids.append(self.ids[found])
            limits.append(limits[-1] + len(found))
        return (np.asarray(limits, np.int64), np.concatenate(scores or [np.empty(0)]).astype(np.float32),
                np.concatenate(ids or [np.empty(0, np.int64)]).astype(np.int64))

    def vectors(self) -> np.ndarray:
        return self._vectors

    def _admitted(self, selection: IdSelection | None) -> np.ndarray:
        if isinstance(selection, SelectedIds):
            return selection.admits(self.ids)
        return np.ones(len(self.ids), bool)


class InMemoryVectorIndex:
    """Segments as .npz bytes of their exact vectors, whatever the spec; counts what it builds and loads."""

    def __init__(self) -> None:
        self.built: list[IndexSpec] = []
        self.loads = 0

    def build(self, content: SegmentVectors, spec: IndexSpec) -> bytes:
        self.built.append(spec)
        buffer = io.BytesIO()
        np.savez(buffer, ids=content.ids, vectors=content.vectors)
        return buffer.getvalue()

    def write(self, content: SegmentVectors, spec: IndexSpec, destination: Path) -> int:
        destination.write_bytes(self.build(content, spec))
        return destination.stat().st_size

    def load(self, data: bytes) -> InMemorySegment:
        self.loads += 1
        return InMemorySegment(self._content(data), len(data))

    def open(self, path: Path) -> InMemorySegment:
        return self.load(path.read_bytes())

    def open_partial(self, read_range, size: int) -> None:
        """Never: the fake's segments are only ever loaded whole."""
        return None

    def read_vectors(self, data: bytes | Path) -> SegmentVectors:
        return self._content(data.read_bytes() if isinstance(data, Path) else data)

    def exclusion(self, excluded_ids: np.ndarray) -> SelectedIds:
        return SelectedIds(np.sort(np.asarray(excluded_ids, np.int64)), exclude=True)

    def selection(self, allowed_ids: np.ndarray) -> SelectedIds:
        return SelectedIds(np.sort(np.asarray(allowed_ids, np.int64)), exclude=False)

    @staticmethod
    def _content(data: bytes) -> SegmentVectors:
        with np.load(io.BytesIO(data)) as arrays:
            return SegmentVectors(arrays["ids"], arrays["vectors"])


class InMemoryObjectStore:
    """One bucket in a dict; etags are content lengths and a counter, enough to tell versions apart."""

    def __init__(self, bucket: str = "fake-bucket") -> None:
        self.bucket = bucket
        self.objects: dict[str, StoredObject] = {}
        self.modified: dict[str, datetime] = {}
        self.gets = 0
        self._lock = threading.Lock()
        self._version = 0

    def get(self, key: str) -> StoredObject:
        with self._lock:
            self.gets += 1
            if key not in self.objects:
                raise ObjectNotFound(key)
            return self.objects[key]

    def head(self, key: str) -> ObjectInfo | None:
        stored = self.objects.get(key)
        return None if stored is None else ObjectInfo(key, stored.etag, len(stored.data))

    def put(
        self,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        with self._lock:
            self._version += 1
            etag = f"{len(data)}-{self._version}"
            self.objects[key] = StoredObject(key, etag, bytes(data), dict(metadata or {}), content_type)
            self.modified[key] = datetime.now(UTC)
            return etag

    def get_range(self, key: str, start: int, end: int) -> bytes:
        data = self.get(key).data
        if end > len(data):
            raise TransientError(f"{key!r}: asked bytes {start}-{end - 1} of {len(data)}")
        return data[start:end]

    def download_file(self, key: str, destination: Path) -> None:
        destination.write_bytes(self.get(key).data)

    def delete_many(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self.objects.pop(key, None)
                self.modified.pop(key, None)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield ObjectInfo(key, self.objects[key].etag, len(self.objects[key].data), self.modified[key])

    def presigned_url(self, key: str, expires_seconds: int = 3600) -> str:
        return f"https://{self.bucket}.example/{key}?expires={expires_seconds}"


class InMemorySearchCatalog:
    """The SearchCatalog over dicts: datasets, their live segments, deleted ids and image locations.

    `publish` registers a segment and bumps the dataset's index_version, as a commit does.
    """

    def __init__(self, bucket: str = "fake-bucket") -> None:
        self.bucket = bucket
        self.datasets: dict[str, Dataset] = {}
        self.segments: dict[int, list[SegmentRef]] = {}
        self.deleted: dict[int, set[int]] = {}
        self.locations: dict[int, ImageLocation] = {}
        self.deletions: dict[int, _Deletion] = {}  # by dataset id, while it is being deleted
        self._last_id = 0

    def add_dataset(self, name: str, model_id: str) -> Dataset:
        now = datetime.now(UTC)
        self._last_id += 1  # never reused, as a sequence's are
        row = Dataset(self._last_id, name, model_id, 0, now, now)
        self.datasets[name] = row
        self.segments[row.id], self.deleted[row.id] = [], set()
        return row

    def publish(self, name: str, segment: SegmentRef, image_ids: Sequence[int]) -> Dataset:
        row = self.get_dataset(name)
        self.segments[row.id].append(segment)
        for image_id in image_ids:
            key = f"datasets/{name}/{image_id}.jpg"
            self.locations[int(image_id)] = ImageLocation(int(image_id), self.bucket, key, None)
        return self._bump(row)

    def delete_images(self, name: str, image_ids: Sequence[int]) -> Dataset:
        row = self.get_dataset(name)
        self.deleted[row.id].update(int(image_id) for image_id in image_ids)
        for image_id in image_ids:
            self.locations.pop(int(image_id), None)
        return self._bump(row)

    def _bump(self, row: Dataset) -> Dataset:
        bumped = replace(row, index_version=row.index_version + 1, updated_at=datetime.now(UTC))
        self.datasets[row.name] = bumped
        return bumped

    def get_dataset(self, name: str) -> Dataset:
        row = self._row(name)
        if row.id in self.deletions:
            raise DatasetDeleting(name)
        return row

    def _row(self, name: str) -> Dataset:
        if name not in self.datasets:
            raise DatasetNotFound(name)
        return self.datasets[name]

    def list_datasets(self) -> Sequence[DatasetSummary]:
        return [self.summarize_dataset(name) for name in sorted(self.datasets)]

    def summarize_dataset(self, name: str, failure_limit: int = 20) -> DatasetSummary:
        row = self._row(name)
        indexed = sum(segment.vector_count for segment in self.segments[row.id]) - len(self.deleted[row.id])
        deletion = self.deletions.get(row.id)
        return DatasetSummary(row, {"pending": 0, "indexed": indexed, "failed": 0, "deleted": len(self.deleted[row.id])},
                              deletion=deletion.progress() if deletion else None)

    def live_segments(self, dataset_id: int) -> Sequence[SegmentRef]:
        return list(self.segments.get(dataset_id, []))

    def deleted_image_ids(self, dataset_id: int) -> set[int]:
        return set(self.deleted.get(dataset_id, set()))

    def image_locations(self, ids: Sequence[int]) -> Mapping[int, ImageLocation]:
        return {image_id: self.locations[image_id] for image_id in ids if image_id in self.locations}

    def filtered_image_ids(
        self, dataset_id: int, key_prefix: str | None, since: datetime | None, until: datetime | None
    ) -> np.ndarray:
        """By key prefix only: the fake keeps no ingest times, so a time filter is refused."""
        if since is not None or until is not None:
            raise NotImplementedError("InMemorySearchCatalog keeps no ingest times")
        name = next(row.name for row in self.datasets.values() if row.id == dataset_id)
        return np.array(sorted(image_id for image_id, location in self.locations.items()  # live images have a location
                               if location.key.startswith(f"datasets/{name}/") and location.key.startswith(key_prefix or "")),
                        dtype=np.int64)

    def remove_dataset(self, name: str) -> DatasetRemoval:
        row = self.datasets.pop(name, None)
        if row is None:
            raise DatasetNotFound(name)
        segments = self.segments.pop(row.id)
        self.deleted.pop(row.id)
        self.deletions.pop(row.id, None)
        return DatasetRemoval(name, [], [segment.object_key for segment in segments])

    def request_deletion(self, name: str, create_missing: bool = False) -> tuple[DeletionTask, DeletionProgress]:
        if create_missing and name not in self.datasets:
            self.add_dataset(name, "")
        row = self._row(name)
        deletion = self.deletions.setdefault(row.id, _Deletion(datetime.now(UTC)))
        return DeletionTask(name, row.id), deletion.progress()

    def claim_deletion(self, dataset_id: int, lease_seconds: int) -> datetime | None:
        deletion = self.deletions.get(dataset_id)
        now = datetime.now(UTC)
        if deletion is None or (deletion.lease_until is not None and deletion.lease_until >= now):
            return None
        deletion.lease_until = now + timedelta(seconds=lease_seconds)
        return deletion.requested_at

    def record_deletion_progress(self, dataset_id: int, objects: int, rows: int, lease_seconds: int) -> None:
        deletion = self.deletions.get(dataset_id)
        if deletion is not None:
            deletion.objects_deleted += objects
            deletion.rows_deleted += rows
            deletion.progress_at = datetime.now(UTC)
            deletion.lease_until = deletion.progress_at + timedelta(seconds=lease_seconds)

    def release_deletion(self, dataset_id: int) -> None:
        if dataset_id in self.deletions:
            self.deletions[dataset_id].lease_until = None

    def delete_image_rows(self, dataset_id: int, limit: int) -> int:
        """The fake's image rows are the locations under the dataset's key prefix."""
        if dataset_id not in self.deletions:
            return 0
        name = next(row.name for row in self.datasets.values() if row.id == dataset_id)
        rows = [image_id for image_id, location in self.locations.items()
                if location.key.startswith(f"datasets/{name}/")][:limit]
        for image_id in rows:
            del self.locations[image_id]
        return len(rows)

    def stalled_deletions(self, requested_before: datetime) -> Sequence[DeletionTask]:
        now = datetime.now(UTC)
        return [DeletionTask(row.name, row.id) for row in self.datasets.values()
                if (deletion := self.deletions.get(row.id)) is not None and deletion.requested_at < requested_before
                and (deletion.lease_until is None or deletion.lease_until < now)]


@dataclass
class _Deletion:
    requested_at: datetime
    objects_deleted: int = 0
    rows_deleted: int = 0
    progress_at: datetime | None = None
    lease_until: datetime | None = None

    def progress(self) -> DeletionProgress:
        return DeletionProgress(self.requested_at, self.objects_deleted, self.rows_deleted, self.progress_at)


class InMemoryMessageQueue:
    """The MessageQueue as a list: what was sent, in order; `take` hands the bodies over as a poller would."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, bodies: Sequence[str]) -> None:
        self.sent.extend(bodies)

    def take(self) -> list[str]:
        bodies, self.sent = self.sent, []
        return bodies


class InMemoryCatalog(InMemorySearchCatalog):
    """The catalog as compaction reads and writes it (clipsearch.compaction.CompactionCatalog), over dicts.

    Each image remembers the segment whose copy of its vector counts (`placements`, like images.segment_id);
    a compaction swaps segments, moves placements and bumps index_version in one step, as its transaction
    does, and refuses (None) when a replaced segment is no longer live.
    """

    def __init__(self, bucket: str = "fake-bucket") -> None:
        super().__init__(bucket)
        self.placements: dict[int, dict[int, str]] = {}  # dataset id -> image id -> segment id
        self.retired: dict[int, list[tuple[SegmentRef, datetime]]] = {}

    def add_dataset(self, name: str, model_id: str) -> Dataset:
        row = super().add_dataset(name, model_id)
        self.placements[row.id], self.retired[row.id] = {}, []
        return row

    def publish(self, name: str, segment: SegmentRef, image_ids: Sequence[int]) -> Dataset:
        row = super().publish(name, segment, image_ids)
        self.placements[row.id].update((int(image_id), segment.id) for image_id in image_ids)
        return row

    def deleted_image_ids(self, dataset_id: int) -> set[int]:
        live = {segment.id for segment in self.segments.get(dataset_id, [])}
        placed = self.placements.get(dataset_id, {})
        return {image_id for image_id in self.deleted.get(dataset_id, set()) if placed.get(image_id) in live}

    def segment_members(self, dataset_id: int) -> Mapping[int, str]:
        deleted = self.deleted.get(dataset_id, set())
        return {image_id: segment_id for image_id, segment_id in self.placements.get(dataset_id, {}).items()
                if image_id not in deleted}

    def publish_compaction(
        self, dataset_id: int, merged: NewSegment, replaced: Sequence[str], kept_ids: Sequence[int]
    ) -> int | None:
        live = self.segments[dataset_id]
        if not set(replaced) <= {segment.id for segment in live}:
            return None
        now = datetime.now(UTC)
        self.retired[dataset_id].extend((segment, now) for segment in live if segment.id in replaced)
        self.segments[dataset_id] = [segment for segment in live if segment.id not in replaced]
        self.segments[dataset_id].append(
            SegmentRef(merged.id, merged.object_key, merged.vector_count, merged.index_type))
        placed = self.placements[dataset_id]
        for image_id in kept_ids:
            if placed.get(int(image_id)) in replaced:
                placed[int(image_id)] = merged.id
        row = next(row for row in self.datasets.values() if row.id == dataset_id)
        return self._bump(row).index_version

    def retired_segments(self, dataset_id: int, retired_before: datetime) -> Sequence[SegmentRef]:
        return [segment for segment, at in self.retired.get(dataset_id, []) if at < retired_before]

    def forget_segments(self, ids: Sequence[str]) -> None:
        for dataset_id, retired in self.retired.items():
            self.retired[dataset_id] = [(segment, at) for segment, at in retired if segment.id not in ids]

    def segment_keys(self, dataset_id: int) -> set[str]:
        return ({segment.object_key for segment in self.segments.get(dataset_id, [])}
                | {segment.object_key for segment, _ in self.retired.get(dataset_id, [])})


class ShardQueryAnswerer(Protocol):
    def search(self, query: ShardQuery) -> list[tuple[int, float]]: ...


class InProcessShardSearcher:
    """The ShardSearcher port in this process: each shard number has its own searcher (as each shard keeps its
    own warm instances), built by `new_searcher` (a ShardSearchService over fakes or real adapters). Queries
    and answers cross the same JSON payload the Lambda adapter sends; every query asked is recorded."""

    def __init__(self, new_searcher: Callable[[], ShardQueryAnswerer]) -> None:
        self._new_searcher = new_searcher
        self.searchers: dict[int, ShardQueryAnswerer] = {}
        self.queries: list[ShardQuery] = []
        self._lock = threading.Lock()

    def search_shard(self, query: ShardQuery) -> list[tuple[int, float]]:
        received = query_from_payload(json.loads(json.dumps(query_payload(query))))
        with self._lock:
            self.queries.append(received)
            searcher = self.searchers.get(received.shard)
            if searcher is None:
                searcher = self.searchers[received.shard] = self._new_searcher()
        return ranking_from_payload(json.loads(json.dumps(ranking_payload(searcher.search(received)))))
