"""SearchService on the in-memory fakes: exact results, refresh on a new index_version, the byte-bounded LRU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from clipsearch.config import SEARCH_RUNTIME_RESERVE_MB, Settings
from clipsearch.fakes import InMemoryObjectStore, InMemorySearchCatalog, InMemoryVectorIndex
from clipsearch.ports import ObjectStore, SearchCatalog, SegmentRef, VectorIndex
from clipsearch.search import SearchService
from clipsearch.segments import FLAT, IndexSpec, SegmentVectors

pytestmark = pytest.mark.unit

DIM = 8
MODEL = "m"


@dataclass
class Embedding:
    vector: np.ndarray
    truncated: bool = False


class KeywordEncoder:
    """A text 'tower': the query text names a basis vector ("e3" -> e3)."""

    def embed_text(self, text: str) -> Embedding:
        vector = np.zeros(DIM, np.float32)
        vector[int(text[1:])] = 1.0
        return Embedding(vector)


@pytest.fixture
def world(tmp_path: Path):
    catalog, store, index = InMemorySearchCatalog(), InMemoryObjectStore(), InMemoryVectorIndex()
    typed: tuple[SearchCatalog, ObjectStore, VectorIndex] = (catalog, store, index)  # a type checker holds the fakes to the ports
    return (*typed, tmp_path)


def service(world, cache_bytes: float = float("inf")) -> SearchService:
    catalog, store, index, tmp_path = world
    return SearchService(
        catalog=catalog, store=store, model_id=MODEL, text_encoder=KeywordEncoder,
        image_encoder=lambda: pytest.fail("no image query here"), max_image_bytes=1000,
        vector_index=index, segment_dir=tmp_path / "segments", index_cache_bytes=cache_bytes,
    )


def add_dataset(world, name: str, first_id: int, count: int = 4) -> int:
    """A dataset whose image i points along basis vector i % DIM; returns its segment's byte size."""
    catalog, store, index, _ = world
    catalog.add_dataset(name, MODEL)
    ids = np.arange(first_id, first_id + count, dtype=np.int64)
    vectors = np.eye(DIM, dtype=np.float32)[np.arange(count) % DIM]
    data = index.build(SegmentVectors(ids, vectors), IndexSpec(FLAT))
    key = f"indexes/{name}/segments/s-{first_id}.faiss"
    store.put(key, data)
    catalog.publish(name, SegmentRef(f"s-{first_id}", key, count, FLAT), ids.tolist())
    return len(data)


def test_search_returns_the_exact_best_and_skips_deleted_images(world, tmp_path: Path) -> None:
    catalog = world[0]
    add_dataset(world, "photos", 100)
    search = service(world)
    assert [hit.image_id for hit in search.search_text("photos", "e2", k=1).hits] == [102]
    catalog.delete_images("photos", [102])
    hits = search.search_text("photos", "e2", k=4).hits
    assert 102 not in [hit.image_id for hit in hits] and len(hits) == 3
    assert list((tmp_path / "segments").iterdir()) == []  # mapped files are unlinked once open


def test_least_recently_searched_datasets_leave_first_when_over_the_byte_budget(world) -> None:
    index = world[2]
    size = add_dataset(world, "a", 100)
    add_dataset(world, "b", 200)
    add_dataset(world, "c", 300)
    search = service(world, cache_bytes=2 * size)
    search.search_text("a", "e0")
    search.search_text("b", "e0")
    search.search_text("a", "e1")  # a is now the most recent
    assert search.cached_datasets == ["b", "a"]
    search.search_text("c", "e0")  # three do not fit: b, the least recent, goes
    assert search.cached_datasets == ["a", "c"]
    loads = index.loads
    search.search_text("a", "e2")
    assert index.loads == loads  # still warm
    search.search_text("b", "e3")  # loaded again; c, now the least recent, goes
    assert index.loads == loads + 1 and search.cached_datasets == ["a", "b"]


def test_a_dataset_larger_than_the_budget_is_still_searched(world) -> None:
    size = add_dataset(world, "big", 100)
    search = service(world, cache_bytes=size // 2)
    assert [hit.image_id for hit in search.search_text("big", "e3", k=1).hits] == [103]
    assert search.cached_datasets == ["big"]


def test_the_cache_budget_follows_the_function_memory_size() -> None:
    base = {"CLIPSEARCH_BUCKET": "b", "CLIPSEARCH_MODEL_ID": "m", "CLIPSEARCH_DATABASE_URL": "postgresql://x"}
    assert Settings.from_env(base).index_cache_bytes == float("inf")
    derived = Settings.from_env({**base, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008"})
    assert derived.index_cache_bytes == (3008 - SEARCH_RUNTIME_RESERVE_MB) * 2**20
    explicit = Settings.from_env({**base, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008", "CLIPSEARCH_INDEX_CACHE_MB": "500"})
    assert explicit.index_cache_bytes == 500 * 2**20


def test_a_text_query_reads_the_row_and_runs_the_tower_on_the_callers_thread(world) -> None:
    """No hand-over to another thread before the FAISS search: a row read beside the tower waited for the tower's
    end (see SearchService.search_text), so the caller reads it first, then embeds."""
    import threading

    _, store, index, tmp_path = world
    threads: dict[str, list[str]] = {"tower": [], "row": []}

    class RecordingEncoder(KeywordEncoder):
        def embed_text(self, text: str) -> Embedding:
            threads["tower"].append(threading.current_thread().name)
            return super().embed_text(text)

    class RecordingCatalog(InMemorySearchCatalog):
        def get_dataset(self, name: str):
            threads["row"].append(threading.current_thread().name)
            return super().get_dataset(name)

    catalog = RecordingCatalog()
    add_dataset((catalog, store, index, tmp_path), "photos", 100)
    search = SearchService(
        catalog=catalog, store=store, model_id=MODEL, text_encoder=RecordingEncoder,
        image_encoder=lambda: pytest.fail("no image query here"), max_image_bytes=1000,
        vector_index=index, segment_dir=tmp_path / "segments",
    )
    search.search_text("photos", "e1")  # cold: the snapshot is loaded (the catalog read again by the refresh)
    threads["tower"].clear()
    threads["row"].clear()

    assert [hit.image_id for hit in search.search_text("photos", "e2", k=1).hits] == [102]
    caller = threading.current_thread().name
    assert threads == {"tower": [caller], "row": [caller]}
