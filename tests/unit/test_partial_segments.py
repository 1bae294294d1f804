"""Cold start on IVF segments opened in part: a first query answered from the lists it probes, exactly as
by the whole segments, before they are downloaded; the whole segments swapped in afterwards, a failed
download retried, a filtered query served by whole segments. Real FAISS segments written by the project's
own writer; the object store is the in-memory fake (counting what is read)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from clipsearch.adapters import faiss_index
from clipsearch.adapters.faiss_index import FaissVectorIndex, PartialFaissSegment
from clipsearch.errors import TransientError
from clipsearch.fakes import InMemoryObjectStore, InMemorySearchCatalog
from clipsearch.ports import SegmentRef
from clipsearch.search import SearchService
from clipsearch.search_results import ImageFilter, SearchOptions
from clipsearch.segments import FLAT, IVF_SQ8, IndexSpec, SegmentVectors, ivf_spec

pytestmark = pytest.mark.unit

DIM = 128
MODEL = "m"
SEGMENT_SIZE = 4000


@dataclass
class Embedding:
    vector: np.ndarray
    truncated: bool = False


class GatedStore(InMemoryObjectStore):
    """Counts ranged reads and whole downloads; whole downloads wait for `downloads_allowed`, and the first
    `failures` of them fail."""

    def __init__(self) -> None:
        super().__init__()
        self.ranges: list[tuple[str, int, int]] = []
        self.downloads: list[str] = []
        self.downloads_allowed = threading.Event()
        self.failures = 0

    def get_range(self, key: str, start: int, end: int) -> bytes:
        self.ranges.append((key, start, end))
        return super().get_range(key, start, end)

    def download_file(self, key: str, destination: Path) -> None:
        assert self.downloads_allowed.wait(30), "a whole download was never allowed"
        self.downloads.append(key)
        if self.failures:
            self.failures -= 1
            raise TransientError(f"{key}: connection reset")
        super().download_file(key, destination)


def clustered(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM))
    vectors = centres[rng.integers(0, 40, count)] + 0.3 * rng.standard_normal((count, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


QUERIES = clustered(12, seed=99)


class QueryEncoder:
    """Text "q7" is the 7th of QUERIES."""

    def embed_text(self, text: str) -> Embedding:
        return Embedding(QUERIES[int(text[1:])])


@pytest.fixture(scope="module")
def segment_files(tmp_path_factory) -> list[tuple[np.ndarray, bytes]]:
    """Two IVF segments as the writer makes them (built once: k-means takes a second)."""
    built = []
    for number in range(2):
        ids = np.arange(1000 + number * SEGMENT_SIZE, 1000 + (number + 1) * SEGMENT_SIZE, dtype=np.int64)
        spec = ivf_spec(SEGMENT_SIZE)
        assert spec.kind == IVF_SQ8
        path = tmp_path_factory.mktemp("segments") / f"s{number}.faiss"
        FaissVectorIndex().write(SegmentVectors(ids, clustered(SEGMENT_SIZE, seed=number)), spec, path)
        built.append((ids, path.read_bytes()))
    return built


@pytest.fixture
def world(segment_files, tmp_path: Path):
    catalog, store = InMemorySearchCatalog(), GatedStore()
    catalog.add_dataset("photos", MODEL)
    for number, (ids, data) in enumerate(segment_files):
        key = f"indexes/photos/segments/s{number}.faiss"
        store.put(key, data)
        catalog.publish("photos", SegmentRef(f"s{number}", key, SEGMENT_SIZE, IVF_SQ8), ids.tolist())
    catalog.delete_images("photos", list(range(1000, 1000 + 2 * SEGMENT_SIZE, 7)))  # excluded in every phase
    return catalog, store, tmp_path


def service(world, partial_load_min_bytes: float) -> SearchService:
    catalog, store, tmp_path = world
    return SearchService(
        catalog=catalog, store=store, model_id=MODEL, text_encoder=QueryEncoder,
        image_encoder=lambda: pytest.fail("no image query here"), max_image_bytes=1000,
        vector_index=FaissVectorIndex(), segment_dir=tmp_path / f"segments-{partial_load_min_bytes}",
        partial_load_min_bytes=partial_load_min_bytes,
    )


def ranking(result) -> list[tuple[int, float]]:
    return [(hit.image_id, hit.score) for hit in result.hits]


def test_a_cold_query_is_answered_from_its_probed_lists_exactly_as_from_whole_segments(world, monkeypatch) -> None:
    catalog, store, _ = world
    # These segments are small (~200 KB): lists fetched one by one show what a query reads.
    monkeypatch.setattr(faiss_index, "_COALESCE_GAP_BYTES", 0)
    partial = service(world, partial_load_min_bytes=1)

    cold = [ranking(partial.search_text("photos", "q0", k=10))]
    first_read = sum(end - start for _, start, end in store.ranges)
    cold += [ranking(partial.search_text("photos", f"q{number}", k=10)) for number in range(1, len(QUERIES))]

    assert store.downloads == []  # answered while the whole downloads are held back
    segment_bytes = sum(len(store.objects[key].data) for key in store.objects)
    assert first_read < segment_bytes / 2
    store.downloads_allowed.set()
    assert partial.wait_for_segments(timeout=30)
    assert sorted(store.downloads) == ["indexes/photos/segments/s0.faiss", "indexes/photos/segments/s1.faiss"]
    reads = len(store.ranges)
    warm = [ranking(partial.search_text("photos", f"q{number}", k=10)) for number in range(len(QUERIES))]
    assert len(store.ranges) == reads  # the whole segments answer now: nothing more is read in part

    whole = service(world, partial_load_min_bytes=float("inf"))
    expected = [ranking(whole.search_text("photos", f"q{number}", k=10)) for number in range(len(QUERIES))]
    assert cold == expected and warm == expected
    deleted = catalog.deleted_image_ids(catalog.get_dataset("photos").id)
    assert all(len(hits) == 10 and not {image_id for image_id, _ in hits} & deleted for hits in cold)


def test_a_failed_whole_download_is_started_again_by_the_next_query(world) -> None:
    _, store, _ = world
    store.failures = 1
    store.downloads_allowed.set()
    partial = service(world, partial_load_min_bytes=1)

    first = ranking(partial.search_text("photos", "q0", k=10))
    partial.wait_for_segments(timeout=30)
    second = ranking(partial.search_text("photos", "q1", k=10))  # still in part: starts the download again
    assert partial.wait_for_segments(timeout=30)
    reads = len(store.ranges)
    third = ranking(partial.search_text("photos", "q2", k=10))

    assert len(store.ranges) == reads  # whole at last
    # One download failed (the attempt fails whole: the other may or may not have started), then both again.
    assert store.failures == 0 and len(store.downloads) in (3, 4)
    assert sorted(store.downloads[-2:]) == ["indexes/photos/segments/s0.faiss", "indexes/photos/segments/s1.faiss"]
    whole = service(world, partial_load_min_bytes=float("inf"))
    assert [first, second, third] == [ranking(whole.search_text("photos", f"q{n}", k=10)) for n in range(3)]


def test_a_filtered_query_waits_for_the_whole_segments(world) -> None:
    _, store, _ = world
    store.downloads_allowed.set()
    partial = service(world, partial_load_min_bytes=1)
    folder = SearchOptions(image_filter=ImageFilter(key_prefix="12"))  # the fake's keys are <id>.jpg

    found = ranking(partial.search_text("photos", "q3", k=10, options=folder))

    assert len(store.downloads) == 2  # waited for them rather than fetching every list in part
    whole = service(world, partial_load_min_bytes=float("inf"))
    assert found == ranking(whole.search_text("photos", "q3", k=10, options=folder))
    assert found and all(str(image_id).startswith("12") for image_id, _ in found)


def test_segments_of_other_kinds_or_under_the_threshold_are_loaded_whole(tmp_path: Path) -> None:
    flat = tmp_path / "flat.faiss"
    FaissVectorIndex().write(SegmentVectors(np.arange(50, dtype=np.int64), clustered(50, seed=3)), IndexSpec(FLAT), flat)
    data = flat.read_bytes()
    assert FaissVectorIndex().open_partial(lambda start, end: data[start:end], len(data)) is None
    assert not issubclass(type(FaissVectorIndex().open(flat)), PartialFaissSegment)


def test_a_partial_segment_admitting_only_some_ids_reads_every_list_and_agrees(world) -> None:
    _, store, _ = world
    key = "indexes/photos/segments/s0.faiss"
    data = store.objects[key].data
    index = FaissVectorIndex()
    partial = index.open_partial(lambda start, end: store.get_range(key, start, end), len(data))
    whole = index.load(data)
    allowed = index.selection(np.arange(1000, 1040, dtype=np.int64))
    for query in QUERIES[:4]:
        expected = whole.search(query[None, :], 10, allowed)
        found = partial.search(query[None, :], 10, allowed)
        assert np.array_equal(found[1], expected[1]) and np.array_equal(found[0], expected[0])
    assert partial.fetched_bytes > 0


def test_a_failed_list_read_adds_nothing_and_the_next_search_answers_exactly(world, monkeypatch) -> None:
    _, store, _ = world
    monkeypatch.setattr(faiss_index, "_COALESCE_GAP_BYTES", 0)  # one ranged GET per list
    key = "indexes/photos/segments/s0.faiss"
    data = store.objects[key].data
    reads = {"lists": 0}
    header_reads = 2  # the header, then the id map

    def read_range(start: int, end: int) -> bytes:
        reads["lists"] += 1
        if reads["lists"] == header_reads + 3:  # one list's read breaks, after others arrived
            raise TransientError(f"{key}: connection reset")
        return data[start:end]

    index = FaissVectorIndex()
    partial = index.open_partial(read_range, len(data))
    whole = index.load(data)
    with pytest.raises(TransientError):
        partial.search(QUERIES[0][None, :], 50)

    found = partial.search(QUERIES[0][None, :], 50)

    expected = whole.search(QUERIES[0][None, :], 50)
    assert np.array_equal(found[1], expected[1]) and np.array_equal(found[0], expected[0])
    assert len(set(np.ravel(found[1]).tolist())) == 50
