"""The compaction use case: merge a dataset's segments, drop dead vectors, remove superseded objects.

A vector is dead when its image is no longer indexed (deleted or replaced) or when the catalog says
its live copy is in another segment (images.segment_id). Merging keeps exactly the live set, picks
the index kind by size and the search function's memory budget (segments.choose_index), writes the
merged segment, then publishes it in one transaction under the
dataset's advisory lock. Objects of retired segments, and orphan objects (a crash between a segment
write and its commit), are deleted only after a grace period, so a search that loaded the previous
version, or a batch about to commit, never finds its segment gone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import numpy as np

from clipsearch.datasets import INDEXES_PREFIX, segment_key
from clipsearch.errors import DatasetNotFound, MaintenanceFailed
from clipsearch.ports import Catalog, Dataset, NewSegment, ObjectStore, SegmentRef, VectorIndex
from clipsearch.segments import FLAT_LIMIT, SegmentVectors, choose_index, new_segment_id

logger = logging.getLogger(__name__)

_LOAD_WORKERS = 4


@dataclass(frozen=True)
class CompactionPolicy:
    max_segments: int = 8
    deleted_fraction: float = 0.2
    orphan_grace_seconds: int = 3600
    flat_limit: int = FLAT_LIMIT
    segment_budget_bytes: float = float("inf")  # what one segment may occupy in a search function

    def needs_compaction(self, segment_count: int, vector_count: int, dead_count: int) -> bool:
        """More live segments than `max_segments`, or a dead share of vectors above `deleted_fraction`."""
        if segment_count > self.max_segments:
            return True
        return vector_count > 0 and dead_count / vector_count > self.deleted_fraction


@dataclass(frozen=True)
class CompactionReport:
    dataset: str
    merged_segments: int = 0
    vectors_kept: int = 0
    vectors_dropped: int = 0
    index_type: str | None = None
    index_version: int | None = None
    objects_removed: int = 0


class CompactionService:
    def __init__(
        self, store: ObjectStore, catalog: Catalog, policy: CompactionPolicy, vector_index: VectorIndex
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._policy = policy
        self._vector_index = vector_index

    def compact_all(self, force: bool = False) -> list[CompactionReport]:
        """Every dataset, each on its own: one failing dataset does not hold back the others.

        Raises MaintenanceFailed naming the failed datasets once all were tried, so the scheduled
        invocation is marked failed.
        """
        reports, failed = [], []
        for summary in self._catalog.list_datasets():
            name = summary.dataset.name
            try:
                reports.append(self.compact_dataset(name, force))
            except DatasetNotFound:
                logger.info("dataset %r was deleted before its compaction", name)
            except Exception:  # any failure: datasets are independent; re-raised below
                logger.exception("compaction of dataset %r failed", name)
                failed.append(name)
        if failed:
            raise MaintenanceFailed(f"compaction failed for datasets {failed} ({len(reports)} compacted)")
        return reports

    def compact_dataset(self, name: str, force: bool = False) -> CompactionReport:
        """Merges when the policy (or `force`) says so, then removes what the grace period releases."""
        dataset = self._catalog.get_dataset(name)
        report = self._merge(dataset, force)
        removed = self._remove_released_objects(dataset)
        return replace(report, objects_removed=removed)

    def _merge(self, dataset: Dataset, force: bool) -> CompactionReport:
        segments = list(self._catalog.live_segments(dataset.id))
        members = self._catalog.segment_members(dataset.id)
        live_ids = {segment.id for segment in segments}
        vector_count = sum(segment.vector_count for segment in segments)
        dead_count = vector_count - sum(1 for segment_id in members.values() if segment_id in live_ids)
        wanted = force or self._policy.needs_compaction(len(segments), vector_count, dead_count)
        if not wanted or (len(segments) <= 1 and dead_count == 0):
            return CompactionReport(dataset.name)

        merged = self._live_content(segments, members)
        spec = choose_index(
            len(merged.ids), self._policy.segment_budget_bytes, self._policy.flat_limit, merged.vectors.shape[1]
        )
        index_type = spec.kind
        segment_id = new_segment_id()
        segment = NewSegment(segment_id, segment_key(dataset.name, segment_id), len(merged.ids), index_type)
        self._store.put(segment.object_key, self._vector_index.build(merged, spec),
                        content_type="application/octet-stream")
        version = self._catalog.publish_compaction(
            dataset.id, segment, [s.id for s in segments], merged.ids.tolist()
        )
        if version is None:
            logger.info("dataset %r: another compaction published first; discarding %s",
                        dataset.name, segment.object_key)
            self._store.delete_many([segment.object_key])
            return CompactionReport(dataset.name)
        logger.info("dataset %r at version %d: merged %d segments into %s (%s, %d vectors, %d dropped)",
                    dataset.name, version, len(segments), segment_id, index_type, len(merged.ids),
                    vector_count - len(merged.ids))
        return CompactionReport(dataset.name, len(segments), len(merged.ids),
                                vector_count - len(merged.ids), index_type, version)

    def _live_content(self, segments: Sequence[SegmentRef], members: dict[int, str]) -> SegmentVectors:
        def live_part(segment: SegmentRef) -> SegmentVectors:
            content = self._vector_index.read_vectors(self._store.get(segment.object_key).data)
            return content.keep(np.array([members.get(int(i)) == segment.id for i in content.ids], bool))

        with ThreadPoolExecutor(_LOAD_WORKERS, thread_name_prefix="segment") as pool:
            parts = list(pool.map(live_part, segments))
        dim = next((part.vectors.shape[1] for part in parts), 0)
        return SegmentVectors.concatenate(parts, dim)

    def _remove_released_objects(self, dataset: Dataset) -> int:
        cutoff = datetime.now(UTC) - timedelta(seconds=self._policy.orphan_grace_seconds)
        retired = self._catalog.retired_segments(dataset.id, cutoff)
        known = self._catalog.segment_keys(dataset.id)
        orphans = [
            item.key
            for item in self._store.list(f"{INDEXES_PREFIX}{dataset.name}/segments/")
            if item.key not in known and item.last_modified is not None and item.last_modified < cutoff
        ]
        doomed = [segment.object_key for segment in retired] + orphans
        if doomed:
            self._store.delete_many(doomed)
            self._catalog.forget_segments([segment.id for segment in retired])
            logger.info("dataset %r: removed %d retired and %d orphan segment objects",
                        dataset.name, len(retired), len(orphans))
        return len(doomed)
