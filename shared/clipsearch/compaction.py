"""The compaction use case: merge small or dirty segments into capped ones, drop dead vectors, remove old objects.

A vector is dead when its image is no longer indexed (deleted or replaced) or when the catalog says
its live copy is in another segment (images.segment_id). Compaction is bounded, LSM-style:
- every output segment holds at most `segment_capacity` vectors, so one segment always fits a search
  (or shard-searcher) function and one build fits well inside the compaction function's timeout;
- a segment holding at least half the capacity is *full*: merging two of them could not stay under the
  cap, so it is left alone while clean, and rewritten (alone or with small ones) once its dead share
  passes `deleted_fraction`;
- the small segments are merged when more than `max_segments` of them pile up (or their dead share is
  over `deleted_fraction`), packed whole, in catalog order, into groups whose live vectors fit the cap.

Each group becomes one output segment, built from its inputs read one at a time (downloaded to /tmp and
memory-mapped), written to /tmp, uploaded, then published in one transaction under the dataset's
advisory lock (object first, row second): a crash between groups leaves the groups published so far
and an untouched rest, and the next invocation plans again from the catalog. An invocation writes at most
`segments_per_run` segments and starts none after `run_seconds`, so a large backlog is worked off over
several scheduled invocations.
Objects of retired segments, and orphan objects (a crash between a segment write and its commit), are
deleted only after a grace period, so a search that loaded the previous version, or a batch about to
commit, never finds its segment gone.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import numpy as np

from clipsearch.datasets import INDEXES_PREFIX, segment_key
from clipsearch.errors import DatasetNotFound, MaintenanceFailed
from clipsearch.ports import NewSegment, ObjectStore, SearchCatalog, SegmentRef, VectorIndex
from clipsearch.segments import FLAT_LIMIT, IVF_SQ8, SegmentVectors, bytes_per_vector, choose_index, new_segment_id

logger = logging.getLogger(__name__)

# The most vectors one output segment holds, whatever the memory budget allows. An ivf_sq8 build is
# k-means over up to 256 points per list, then one assignment pass, so its time grows ~n^1.5: measured
# here (2 shared AVX2 cores) 100k in 33 s CPU / 55 s wall (load 4) and 200k in 78 s CPU / 184 s wall
# (load 9), against half of the compaction function's 900 s timeout; 300k would be ~340 s wall at that
# load. Its float32 input (~0.4 GB) and codes (~0.1 GB) keep a build far below 3 GB.
MAX_SEGMENT_VECTORS = 200_000
# Output segments one invocation writes: three full builds at the loaded figure above (~3 x 184 s) stay
# inside the 900 s timeout; a bigger backlog continues at the next scheduled invocation.
SEGMENTS_PER_RUN = 3
# No new output segment is started after this many seconds of an invocation: with one build under half
# the 900 s timeout, the last one started still finishes (on a host slower than measured, too).
RUN_SECONDS = 450.0


class CompactionCatalog(SearchCatalog, Protocol):
    """The part of the Catalog port compaction reads and writes (PostgresCatalog and the fakes provide it)."""

    def segment_members(self, dataset_id: int) -> Mapping[int, str]: ...

    def publish_compaction(
        self, dataset_id: int, merged: NewSegment, replaced: Sequence[str], kept_ids: Sequence[int]
    ) -> int | None: ...

    def retired_segments(self, dataset_id: int, retired_before: datetime) -> Sequence[SegmentRef]: ...

    def forget_segments(self, ids: Sequence[str]) -> None: ...

    def segment_keys(self, dataset_id: int) -> set[str]: ...


@dataclass(frozen=True)
class CompactionPolicy:
    max_segments: int = 8  # small (under half-capacity) segments tolerated before they are merged
    deleted_fraction: float = 0.2
    orphan_grace_seconds: int = 3600
    flat_limit: int = FLAT_LIMIT
    segment_budget_bytes: float = float("inf")  # what one segment may occupy in a search function
    max_segment_vectors: int = MAX_SEGMENT_VECTORS
    segments_per_run: int = SEGMENTS_PER_RUN
    run_seconds: float = RUN_SECONDS
    dim: int = 512

    @property
    def segment_capacity(self) -> int:
        """Vectors per output segment: `max_segment_vectors`, or fewer when the largest kind (ivf_sq8) of
        that many would not fit `segment_budget_bytes`."""
        fits_budget = self.segment_budget_bytes / bytes_per_vector(IVF_SQ8, self.dim)
        return max(1, int(min(self.max_segment_vectors, fits_budget)))

    def needs_compaction(self, segment_count: int, vector_count: int, dead_count: int) -> bool:
        """More segments than `max_segments`, or a dead share of vectors above `deleted_fraction`."""
        return segment_count > self.max_segments or self.is_dirty(vector_count, dead_count)

    def is_dirty(self, vector_count: int, dead_count: int) -> bool:
        return vector_count > 0 and dead_count / vector_count > self.deleted_fraction


@dataclass(frozen=True)
class SegmentState:
    """A live segment with the number of its vectors that are still live (per the catalog)."""

    ref: SegmentRef
    live_count: int

    @property
    def dead_count(self) -> int:
        return self.ref.vector_count - self.live_count


@dataclass(frozen=True)
class CompactionPlan:
    """Groups of segments, each to become one output segment, in the order they are written; and the
    segments holding more vectors than the cap (written before it existed), left as they are: reading one
    would break the step's memory bound, and splitting it would need a catalog method that publishes
    several segments in one transaction (searches still skip their deleted vectors)."""

    groups: tuple[tuple[SegmentState, ...], ...]
    oversized: tuple[SegmentState, ...] = ()


def plan_compaction(
    segments: Sequence[SegmentState], policy: CompactionPolicy, force: bool = False
) -> CompactionPlan:
    """Which segments to merge into which outputs (pure: the catalog's counts in, groups out).

    Full segments (at least half the capacity) are rewritten only when dirty; small ones are merged when
    the policy says (or `force`). Candidates are packed whole, in the given order, while their live
    vectors fit the capacity. A group of one segment without dead vectors would rewrite it unchanged, and
    is dropped.
    """
    capacity = policy.segment_capacity
    oversized = tuple(state for state in segments if state.ref.vector_count > capacity)
    fitting = [state for state in segments if state.ref.vector_count <= capacity]
    small = [state for state in fitting if 2 * state.ref.vector_count < capacity]
    small_ids = {state.ref.id for state in small}
    small_vectors = sum(state.ref.vector_count for state in small)
    small_dead = sum(state.dead_count for state in small)
    merge_small = force or policy.needs_compaction(len(small), small_vectors, small_dead)

    def rewritten(state: SegmentState) -> bool:
        if state.ref.id in small_ids:
            return merge_small
        return policy.is_dirty(state.ref.vector_count, state.dead_count) or (force and state.dead_count > 0)

    candidates = [state for state in fitting if rewritten(state)]
    groups: list[tuple[SegmentState, ...]] = []
    current: list[SegmentState] = []
    for state in candidates:
        if current and sum(member.live_count for member in current) + state.live_count > capacity:
            groups.append(tuple(current))
            current = []
        current.append(state)
    if current:
        groups.append(tuple(current))
    worthwhile = tuple(group for group in groups if len(group) > 1 or group[0].dead_count)
    return CompactionPlan(worthwhile, oversized)


@dataclass(frozen=True)
class CompactionReport:
    dataset: str
    merged_segments: int = 0  # input segments retired
    segments_written: int = 0
    vectors_kept: int = 0
    vectors_dropped: int = 0
    index_types: tuple[str, ...] = ()  # of the written segments, in order
    index_version: int | None = None  # after the last publish
    groups_pending: int = 0  # planned outputs left for the next invocation (segments_per_run reached)
    oversized_segments: int = 0  # live segments holding more vectors than the capacity, left as they are
    objects_removed: int = 0


class CompactionService:
    def __init__(
        self,
        store: ObjectStore,
        catalog: CompactionCatalog,
        policy: CompactionPolicy,
        vector_index: VectorIndex,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._store = store
        self._catalog = catalog
        self._policy = policy
        self._vector_index = vector_index

    @property
    def policy(self) -> CompactionPolicy:
        return self._policy

    def with_policy(self, policy: CompactionPolicy) -> CompactionService:
        """The same adapters under another policy."""
        return CompactionService(self._store, self._catalog, policy, self._vector_index, self._clock)

    def compact_all(self, force: bool = False) -> list[CompactionReport]:
        """Every dataset, each on its own: one failing dataset does not hold back the others.

        The invocation writes at most `segments_per_run` segments in all, and starts none after
        `run_seconds`; datasets reached after that only get their released objects removed. Raises
        MaintenanceFailed naming the failed datasets once all were tried, so the scheduled invocation is
        marked failed.
        """
        reports, failed = [], []
        allowance = self._policy.segments_per_run
        deadline = self._clock() + self._policy.run_seconds
        for summary in self._catalog.list_datasets():
            name = summary.dataset.name
            try:
                report = self.compact_dataset(name, force, allowance, deadline)
                allowance -= report.segments_written
                reports.append(report)
            except DatasetNotFound:
                logger.info("dataset %r was deleted before its compaction", name)
            except Exception:  # any failure: datasets are independent; re-raised below
                logger.exception("compaction of dataset %r failed", name)
                failed.append(name)
        if failed:
            raise MaintenanceFailed(f"compaction failed for datasets {failed} ({len(reports)} compacted)")
        return reports

    def compact_dataset(
        self, name: str, force: bool = False, max_segments_written: int | None = None, deadline: float | None = None
    ) -> CompactionReport:
        """Merges what the plan says (at most `max_segments_written` outputs, by default the policy's
        `segments_per_run`, none started after `deadline`, by default `run_seconds` from now), then removes
        what the grace period releases."""
        dataset = self._catalog.get_dataset(name)
        limit = self._policy.segments_per_run if max_segments_written is None else max_segments_written
        deadline = self._clock() + self._policy.run_seconds if deadline is None else deadline
        report = self._merge(dataset.id, dataset.name, force, limit, deadline)
        removed = self._remove_released_objects(dataset.id, dataset.name)
        return replace(report, objects_removed=removed)

    def _merge(self, dataset_id: int, name: str, force: bool, limit: int, deadline: float) -> CompactionReport:
        members = self._catalog.segment_members(dataset_id)
        live_counts: dict[str, int] = {}
        for segment_id in members.values():
            live_counts[segment_id] = live_counts.get(segment_id, 0) + 1
        states = [SegmentState(ref, live_counts.get(ref.id, 0)) for ref in self._catalog.live_segments(dataset_id)]
        plan = plan_compaction(states, self._policy, force)
        if plan.oversized:
            logger.warning("dataset %r: %d segments hold more than %d vectors and are left as they are",
                           name, len(plan.oversized), self._policy.segment_capacity)
        report = CompactionReport(name, groups_pending=len(plan.groups), oversized_segments=len(plan.oversized))
        with tempfile.TemporaryDirectory(prefix="compaction-") as work:
            for group in plan.groups[:max(0, limit)]:
                if self._clock() >= deadline:
                    break
                report = self._merge_group(dataset_id, name, group, members, Path(work), report)
        return report

    def _merge_group(
        self, dataset_id: int, name: str, group: Sequence[SegmentState], members: Mapping[int, str],
        work: Path, report: CompactionReport,
    ) -> CompactionReport:
        """One output segment from `group`: read, write to /tmp, upload, publish (or discard if another
        compaction published first)."""
        content = self._live_content(group, members, work)
        spec = choose_index(len(content.ids), self._policy.segment_budget_bytes, self._policy.flat_limit,
                            content.vectors.shape[1])
        segment_id = new_segment_id()
        segment = NewSegment(segment_id, segment_key(name, segment_id), len(content.ids), spec.kind)
        output = work / f"{segment_id}.segment"
        self._vector_index.write(content, spec, output)
        kept_ids = content.ids.tolist()
        del content  # the upload below holds the file's bytes instead
        self._store.put(segment.object_key, output.read_bytes(), content_type="application/octet-stream")
        output.unlink()
        replaced = [state.ref.id for state in group]
        version = self._catalog.publish_compaction(dataset_id, segment, replaced, kept_ids)
        if version is None:
            logger.info("dataset %r: another compaction published first, or a deletion began; discarding %s",
                        name, segment.object_key)
            self._store.delete_many([segment.object_key])
            return report
        dropped = sum(state.ref.vector_count for state in group) - len(kept_ids)
        logger.info("dataset %r at version %d: merged %d segments into %s (%s, %d vectors, %d dropped)",
                    name, version, len(group), segment_id, spec.kind, len(kept_ids), dropped)
        return replace(
            report,
            merged_segments=report.merged_segments + len(group),
            segments_written=report.segments_written + 1,
            vectors_kept=report.vectors_kept + len(kept_ids),
            vectors_dropped=report.vectors_dropped + dropped,
            index_types=(*report.index_types, spec.kind),
            index_version=version,
            groups_pending=report.groups_pending - 1,
        )

    def _live_content(
        self, group: Sequence[SegmentState], members: Mapping[int, str], work: Path
    ) -> SegmentVectors:
        """The live vectors of `group`, input by input into one array sized by the catalog's counts: one
        input segment is decoded at a time, and nothing is concatenated (no second copy)."""
        total = sum(state.live_count for state in group)
        ids = np.empty(total, np.int64)
        vectors: np.ndarray | None = None
        filled = 0
        for state in group:
            path = work / f"{state.ref.id}.segment"
            self._store.download_file(state.ref.object_key, path)
            try:
                part = self._vector_index.read_vectors(path)
            finally:
                path.unlink(missing_ok=True)
            live = np.fromiter((members.get(int(i)) == state.ref.id for i in part.ids), bool, len(part.ids))
            found = int(live.sum())
            if found != state.live_count:
                raise MaintenanceFailed(
                    f"segment {state.ref.id} holds {found} of the {state.live_count} live vectors the catalog "
                    f"places in it"
                )
            if vectors is None:
                vectors = np.empty((total, part.vectors.shape[1]), np.float32)
            np.compress(live, part.ids, out=ids[filled:filled + found])
            np.compress(live, part.vectors, axis=0, out=vectors[filled:filled + found])
            filled += found
            del part
        return SegmentVectors(ids, vectors if vectors is not None else np.empty((0, self._policy.dim), np.float32))

    def _remove_released_objects(self, dataset_id: int, name: str) -> int:
        cutoff = datetime.now(UTC) - timedelta(seconds=self._policy.orphan_grace_seconds)
        retired = self._catalog.retired_segments(dataset_id, cutoff)
        known = self._catalog.segment_keys(dataset_id)
        orphans = [
            item.key
            for item in self._store.list(f"{INDEXES_PREFIX}{name}/segments/")
            if item.key not in known and item.last_modified is not None and item.last_modified < cutoff
        ]
        doomed = [segment.object_key for segment in retired] + orphans
        if doomed:
            self._store.delete_many(doomed)
            self._catalog.forget_segments([segment.id for segment in retired])
            logger.info("dataset %r: removed %d retired and %d orphan segment objects",
                        name, len(retired), len(orphans))
        return len(doomed)
