"""Bounded compaction on the in-memory fakes, with a capacity of a few hundred vectors: the plan, the live
set kept exactly, every segment under the cap, search unchanged, resumption, and crashes between steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clipsearch.compaction import (
    CompactionCatalog,
    CompactionPlan,
    CompactionPolicy,
    CompactionService,
    SegmentState,
    plan_compaction,
)
from clipsearch.fakes import InMemoryCatalog, InMemoryObjectStore, InMemoryVectorIndex
from clipsearch.ports import NewSegment, ObjectStore, SegmentRef, VectorIndex
from clipsearch.search import SearchService
from clipsearch.segments import FLAT, IndexSpec, SegmentVectors

pytestmark = pytest.mark.unit

DIM = 16
MODEL = "m"
DATASET = "photos"
CAP = 200


def policy(**overrides) -> CompactionPolicy:
    settings = dict(max_segments=4, max_segment_vectors=CAP, segments_per_run=100, dim=DIM)
    return CompactionPolicy(**(settings | overrides))


def state(segment_id: str, vector_count: int, live_count: int | None = None) -> SegmentState:
    ref = SegmentRef(segment_id, f"indexes/{DATASET}/segments/{segment_id}.faiss", vector_count, FLAT)
    return SegmentState(ref, vector_count if live_count is None else live_count)


def planned(plan: CompactionPlan) -> list[list[str]]:
    return [[member.ref.id for member in group] for group in plan.groups]


# --- the plan (pure) ------------------------------------------------------------------------------


def test_full_clean_segments_stay_and_small_ones_pack_in_order_under_the_cap() -> None:
    segments = [state("full-a", 150), state("s1", 60), state("s2", 90), state("full-b", 200, 190),
                state("s3", 70), state("s4", 30), state("s5", 10)]
    plan = plan_compaction(segments, policy())
    assert planned(plan) == [["s1", "s2"], ["s3", "s4", "s5"]]  # 60+90 fits, +70 would not
    assert plan.oversized == ()


def test_small_segments_wait_until_more_than_max_segments_pile_up() -> None:
    assert planned(plan_compaction([state(f"s{i}", 10) for i in range(4)], policy())) == []
    assert planned(plan_compaction([state(f"s{i}", 10) for i in range(5)], policy())) == [
        [f"s{i}" for i in range(5)]]
    assert planned(plan_compaction([state(f"s{i}", 10) for i in range(2)], policy(), force=True)) == [["s0", "s1"]]


def test_a_dirty_full_segment_is_rewritten_and_an_oversized_one_is_reported() -> None:
    segments = [state("dirty", 180, 100), state("clean", 180, 170), state("legacy", 500, 450)]
    plan = plan_compaction(segments, policy())
    assert planned(plan) == [["dirty"]]
    assert [member.ref.id for member in plan.oversized] == ["legacy"]
    # a lone small segment with dead vectors is worth rewriting; a lone clean one is not
    assert planned(plan_compaction([state("s", 50, 20)], policy(), force=True)) == [["s"]]
    assert planned(plan_compaction([state("t", 50)], policy(), force=True)) == []


def test_capacity_shrinks_to_what_the_search_budget_holds() -> None:
    assert policy().segment_capacity == CAP
    # ivf_sq8 at 16 dims costs 16 + 16 bytes per vector
    assert policy(segment_budget_bytes=32 * 120).segment_capacity == 120


# --- the service on the fakes ---------------------------------------------------------------------


class KeywordEncoder:
    """A text 'tower': "e3" is the basis vector e3, so a query ranks by one coordinate."""

    class Embedding:
        def __init__(self, vector: np.ndarray) -> None:
            self.vector, self.truncated = vector, False

    def embed_text(self, text: str):
        vector = np.zeros(DIM, np.float32)
        vector[int(text[1:])] = 1.0
        return self.Embedding(vector)


@pytest.fixture
def world():
    catalog, store, index = InMemoryCatalog(), InMemoryObjectStore(), InMemoryVectorIndex()
    typed: tuple[CompactionCatalog, ObjectStore, VectorIndex] = (catalog, store, index)  # held to the ports
    return typed


def ingest(world, sizes: list[int], seed: int = 0) -> dict[int, np.ndarray]:
    """Segments of the given sizes (consecutive ids, random unit vectors); returns id -> vector."""
    catalog, store, index = world
    catalog.add_dataset(DATASET, MODEL)
    rng = np.random.default_rng(seed)
    vectors: dict[int, np.ndarray] = {}
    next_id = 1
    for position, size in enumerate(sizes):
        ids = np.arange(next_id, next_id + size, dtype=np.int64)
        batch = rng.standard_normal((size, DIM)).astype(np.float32)
        batch /= np.linalg.norm(batch, axis=1, keepdims=True)
        key = f"indexes/{DATASET}/segments/batch-{position:03d}.faiss"
        store.put(key, index.build(SegmentVectors(ids, batch), IndexSpec(FLAT)))
        catalog.publish(DATASET, SegmentRef(f"batch-{position:03d}", key, size, FLAT), ids.tolist())
        vectors.update(zip(ids.tolist(), batch))
        next_id += size
    return vectors


def stored_live_vectors(world) -> dict[int, list[np.ndarray]]:
    """Every live image's copies in the live segments the catalog places it in (exactly one expected)."""
    catalog, store, index = world
    dataset = catalog.get_dataset(DATASET)
    members = catalog.segment_members(dataset.id)
    copies: dict[int, list[np.ndarray]] = {}
    for segment in catalog.live_segments(dataset.id):
        content = index.read_vectors(store.get(segment.object_key).data)
        assert len(content.ids) == segment.vector_count
        for image_id, vector in zip(content.ids.tolist(), content.vectors):
            if members.get(image_id) == segment.id:
                copies.setdefault(image_id, []).append(vector)
    return copies


def assert_live_set(world, expected: dict[int, np.ndarray]) -> None:
    copies = stored_live_vectors(world)
    assert sorted(copies) == sorted(expected)
    for image_id, found in copies.items():
        assert len(found) == 1, f"image {image_id} has {len(found)} live copies"
        np.testing.assert_array_equal(found[0], expected[image_id])


def searcher(world, tmp_path: Path) -> SearchService:
    catalog, store, index = world
    return SearchService(
        catalog=catalog, store=store, model_id=MODEL, text_encoder=KeywordEncoder,
        image_encoder=lambda: pytest.fail("no image query here"), max_image_bytes=1000,
        vector_index=index, segment_dir=tmp_path / "segments",
    )


def rankings(world, tmp_path: Path) -> list[list[tuple[int, float]]]:
    search = searcher(world, tmp_path)
    return [[(hit.image_id, hit.score) for hit in search.search_text(DATASET, f"e{axis}", k=25).hits]
            for axis in range(DIM)]


SIZES = [37, 120, 8, 61, 150, 23, 90, 44, 5, 77, 130, 12, 66, 99, 31]  # 953 vectors in 15 segments


def test_bounded_compaction_keeps_the_live_set_under_the_cap_and_search_unchanged(world, tmp_path) -> None:
    catalog, store, index = world
    vectors = ingest(world, SIZES)
    deleted = list(range(3, 953, 7))
    catalog.delete_images(DATASET, deleted)
    live = {image_id: vector for image_id, vector in vectors.items() if image_id not in deleted}
    before = rankings(world, tmp_path / "before")

    report = CompactionService(store, catalog, policy(), index).compact_dataset(DATASET, force=True)

    segments = catalog.live_segments(catalog.get_dataset(DATASET).id)
    assert report.segments_written >= -(-len(live) // CAP) and report.groups_pending == 0
    assert report.vectors_kept + report.vectors_dropped == sum(SIZES)
    assert report.vectors_dropped == len(deleted) and report.vectors_kept == len(live)
    assert max(segment.vector_count for segment in segments) <= CAP
    assert_live_set(world, live)
    assert catalog.deleted_image_ids(catalog.get_dataset(DATASET).id) == set()
    assert rankings(world, tmp_path / "after") == before


def test_a_second_run_leaves_full_clean_segments_alone(world) -> None:
    catalog, store, index = world
    ingest(world, SIZES)
    service = CompactionService(store, catalog, policy(), index)
    service.compact_dataset(DATASET)
    dataset = catalog.get_dataset(DATASET)
    settled = catalog.live_segments(dataset.id)
    again = service.compact_dataset(DATASET)
    assert again.segments_written == 0 and catalog.live_segments(dataset.id) == settled
    assert catalog.get_dataset(DATASET).index_version == dataset.index_version
    # deleting most of one full segment makes it dirty: only that one is rewritten
    full = next(segment for segment in settled if 2 * segment.vector_count >= CAP)
    victims = [image_id for image_id, segment_id in catalog.segment_members(dataset.id).items()
               if segment_id == full.id][: full.vector_count // 2]
    catalog.delete_images(DATASET, victims)
    rewrite = service.compact_dataset(DATASET)
    assert (rewrite.merged_segments, rewrite.segments_written, rewrite.vectors_dropped) == (1, 1, len(victims))
    assert {segment.id for segment in settled} - {s.id for s in catalog.live_segments(dataset.id)} == {full.id}


def test_a_run_writes_at_most_segments_per_run_and_the_next_one_resumes(world) -> None:
    catalog, store, index = world
    vectors = ingest(world, SIZES)
    service = CompactionService(store, catalog, policy(segments_per_run=1), index)
    reports = []
    while not reports or reports[-1].groups_pending:
        reports.append(service.compact_all()[0])
        assert reports[-1].segments_written <= 1
        assert_live_set(world, vectors)  # consistent after every invocation
    # 12 small segments planned into 4 outputs; each invocation plans again from the catalog, and stops
    # once no more than max_segments (4) small ones are left
    assert reports[0].groups_pending == 3 and [r.segments_written for r in reports] == [1, 1, 1, 0]
    small = [s for s in catalog.live_segments(catalog.get_dataset(DATASET).id) if 2 * s.vector_count < CAP]
    assert len(small) == 2
    assert max(s.vector_count for s in catalog.live_segments(catalog.get_dataset(DATASET).id)) <= CAP


def test_no_output_is_started_after_run_seconds(world) -> None:
    catalog, store, index = world
    vectors = ingest(world, SIZES)
    now = [0.0]

    def clock() -> float:  # every reading is 100 s later: each output "takes" 100 s
        now[0] += 100.0
        return now[0]

    service = CompactionService(store, catalog, policy(run_seconds=250), index, clock)
    first = service.compact_all()[0]
    assert first.segments_written == 2 and first.groups_pending == 2  # started at 100 s and 200 s, not at 300 s
    assert_live_set(world, vectors)


class CrashingStore(InMemoryObjectStore):
    """Dies in a segment upload once armed: `puts_left` more succeed first (None: disarmed)."""

    puts_left: int | None = None

    def put(self, key, data, **kwargs):
        if self.puts_left is not None and key.startswith("indexes/"):
            if self.puts_left == 0:
                raise RuntimeError("killed during the upload")
            self.puts_left -= 1
        return super().put(key, data, **kwargs)


class CrashingCatalog(InMemoryCatalog):
    """Dies in a publish once armed (`publishes_left` more succeed first): before its transaction (nothing
    changed) or, with `commit_first`, just after it (all changed, the caller never hears back)."""

    publishes_left: int | None = None
    commit_first = False

    def publish_compaction(self, dataset_id: int, merged: NewSegment, replaced, kept_ids) -> int | None:
        if self.publishes_left == 0:
            if self.commit_first:
                super().publish_compaction(dataset_id, merged, replaced, kept_ids)
            raise RuntimeError("killed around the commit")
        if self.publishes_left is not None:
            self.publishes_left -= 1
        return super().publish_compaction(dataset_id, merged, replaced, kept_ids)


@pytest.mark.parametrize("crash", ["upload 1", "upload 2", "publish 1", "publish 2 committed"])
def test_a_crash_between_steps_leaves_a_consistent_catalog_and_the_next_run_finishes(crash, tmp_path) -> None:
    step, number, *committed = crash.split()
    store, catalog = CrashingStore(), CrashingCatalog()
    world = (catalog, store, InMemoryVectorIndex())
    vectors = ingest(world, SIZES)
    before = rankings(world, tmp_path / "before")
    if step == "upload":
        store.puts_left = int(number) - 1
    else:
        catalog.publishes_left, catalog.commit_first = int(number) - 1, bool(committed)

    with pytest.raises(RuntimeError, match="killed"):
        CompactionService(store, catalog, policy(), world[2]).compact_dataset(DATASET, force=True)
    assert_live_set(world, vectors)
    assert rankings(world, tmp_path / "crashed") == before

    store.puts_left = catalog.publishes_left = None  # the next invocation runs without faults
    immediate = CompactionService(store, catalog, policy(orphan_grace_seconds=-5), world[2])
    assert immediate.compact_dataset(DATASET, force=True).segments_written >= 1
    immediate.compact_dataset(DATASET)  # removes the retired and orphan objects of the run above
    dataset = catalog.get_dataset(DATASET)
    assert_live_set(world, vectors)
    assert max(s.vector_count for s in catalog.live_segments(dataset.id)) <= CAP
    assert {info.key for info in store.list(f"indexes/{DATASET}/")} == {
        s.object_key for s in catalog.live_segments(dataset.id)}  # no orphan left
    assert rankings(world, tmp_path / "after") == before


def test_an_output_another_compaction_beat_is_discarded(world) -> None:
    catalog, store, index = world
    vectors = ingest(world, [10] * 6)

    class Rival(InMemoryCatalog):
        def publish_compaction(self, *args, **kwargs):
            return None

    rival = Rival()
    rival.__dict__.update(catalog.__dict__)
    report = CompactionService(store, rival, policy(), index).compact_dataset(DATASET)
    assert report.segments_written == 0
    assert len(list(store.list(f"indexes/{DATASET}/"))) == 6  # the output was deleted again
    assert_live_set(world, vectors)
