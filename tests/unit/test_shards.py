"""Fan-out on the in-memory fakes: shard plans, merging, and a sharded search identical to the unsharded one."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from clipsearch.adapters.lambda_shards import LambdaShardSearcher
from clipsearch.config import SHARD_RUNTIME_RESERVE_MB, Settings
from clipsearch.errors import TransientError
from clipsearch.fakes import InMemoryObjectStore, InMemorySearchCatalog, InMemoryVectorIndex, InProcessShardSearcher
from clipsearch.ports import SegmentRef, ShardQuery, ShardSearcher
from clipsearch.search import SearchService, ShardSearchService
from clipsearch.search_results import ImageFilter, SearchOptions
from clipsearch.shards import (
    SegmentOverBudget,
    SizedSegment,
    merge_rankings,
    plan_shards,
    query_from_payload,
    query_payload,
)
from clipsearch.segments import FLAT, IndexSpec, SegmentVectors

pytestmark = pytest.mark.unit

DIM = 16
MODEL = "m"
SEGMENTS = 6
PER_SEGMENT = 40
QUERIES = np.random.default_rng(3).standard_normal((12, DIM)).astype(np.float32)


def sized(segment_id: str, nbytes: int) -> SizedSegment:
    return SizedSegment(SegmentRef(segment_id, f"indexes/d/segments/{segment_id}.faiss", 10, FLAT), nbytes)


def test_a_plan_groups_whole_segments_within_the_budget_the_same_way_whatever_the_order() -> None:
    segments = [sized(f"s{i:02d}", size) for i, size in enumerate([40, 70, 30, 100, 10, 60, 50])]
    plan = plan_shards(segments, budget_bytes=100)
    for _ in range(5):
        shuffled = segments[:]
        random.Random(_).shuffle(shuffled)
        assert plan_shards(shuffled, 100) == plan
    assert [[ref.id for ref in shard.segments] for shard in plan] == [["s00"], ["s01", "s02"], ["s03"],
                                                                      ["s04", "s05"], ["s06"]]
    assert all(shard.nbytes <= 100 for shard in plan)
    assert [shard.number for shard in plan] == list(range(len(plan)))


def test_a_newer_segment_leaves_the_earlier_shards_as_they_were() -> None:
    segments = [sized(f"s{i:02d}", 45) for i in range(5)]
    before = plan_shards(segments, 100)
    after = plan_shards(segments + [sized("s05", 45)], 100)
    assert after[:-1] == before[:-1]
    assert [ref.id for ref in after[-1].segments] == ["s04", "s05"]


def test_a_segment_over_the_shard_budget_is_refused() -> None:
    with pytest.raises(SegmentOverBudget, match="s01"):
        plan_shards([sized("s00", 10), sized("s01", 101)], 100)


def test_merging_orders_by_score_then_id_and_counts_an_id_once() -> None:
    merged = merge_rankings([[(7, 0.9), (3, 0.5), (9, 0.5)], [(2, 0.5), (7, 0.95), (1, 0.1)]], k=4)
    assert merged == [(7, 0.95), (2, 0.5), (3, 0.5), (9, 0.5)]


def test_the_payload_carries_the_vector_bits_and_the_filter() -> None:
    query = ShardQuery("d", 4, 17, 1, (SegmentRef("s1", "indexes/d/segments/s1.faiss", 3, FLAT),),
                       QUERIES[0], 25, ImageFilter("cats/", datetime(2026, 1, 2, tzinfo=UTC), None))
    received = query_from_payload(query_payload(query))
    assert received.vector.dtype == np.float32 and received.vector.tobytes() == QUERIES[0].tobytes()
    assert (received.dataset, received.dataset_id, received.index_version, received.shard, received.k) == ("d", 4, 17, 1, 25)
    assert received.segments == query.segments and received.image_filter == query.image_filter


@dataclass
class Embedding:
    vector: np.ndarray
    truncated: bool = False


class TableEncoder:
    """A text 'tower': "q3" is row 3 of QUERIES, normalized."""

    def embed_text(self, text: str) -> Embedding:
        vector = QUERIES[int(text[1:])]
        return Embedding(vector / np.linalg.norm(vector))


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.catalog, self.store, self.index = InMemorySearchCatalog(), InMemoryObjectStore(), InMemoryVectorIndex()
        self.tmp_path = tmp_path
        self.catalog.add_dataset("photos", MODEL)
        rng = np.random.default_rng(11)
        centres = rng.standard_normal((5, DIM)).astype(np.float32)
        self.segment_bytes = 0
        for segment in range(SEGMENTS):
            self.publish(segment, centres[rng.integers(0, 5, PER_SEGMENT)] + 0.4 * rng.standard_normal((PER_SEGMENT, DIM)))
        # Two identical vectors in different segments: a tie the merge must break by id in every page.
        self.publish(SEGMENTS, np.tile(QUERIES[5], (2, 1)), ids=np.array([10_001, 10_000]))

    def publish(self, segment: int, vectors: np.ndarray, ids: np.ndarray | None = None) -> None:
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        if ids is None:
            ids = np.arange(segment * PER_SEGMENT + 1, segment * PER_SEGMENT + 1 + len(vectors), dtype=np.int64)
        data = self.index.build(SegmentVectors(ids, vectors), IndexSpec(FLAT))
        segment_id = f"{segment:04d}-seg"
        key = f"indexes/photos/segments/{segment_id}.faiss"
        self.store.put(key, data)
        self.catalog.publish("photos", SegmentRef(segment_id, key, len(ids), FLAT), ids.tolist())
        if segment == 0:
            self.segment_bytes = len(data)

    def service(self, shard_searcher: ShardSearcher | None = None, name: str = "search",
                cache_segments: float = 1.5, shard_segments: float = 2.05) -> SearchService:
        """By default over budget at two segments: the dataset fans out; each shard holds two segments."""
        return SearchService(
            catalog=self.catalog, store=self.store, model_id=MODEL, text_encoder=TableEncoder,
            image_encoder=lambda: pytest.fail("no image query here"), max_image_bytes=1000,
            vector_index=self.index, segment_dir=self.tmp_path / name,
            index_cache_bytes=cache_segments * self.segment_bytes, shard_searcher=shard_searcher,
            shard_budget_bytes=shard_segments * self.segment_bytes,
        )

    def shard_searcher(self) -> InProcessShardSearcher:
        return InProcessShardSearcher(lambda: ShardSearchService(
            self.catalog, self.store, self.index, self.tmp_path / "shards", cache_bytes=2.05 * self.segment_bytes))


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def ranking(result) -> list[tuple[int, float]]:
    return [(hit.image_id, hit.score) for hit in result.hits]


def test_a_dataset_over_the_budget_fans_out_and_answers_as_one_index_would(world: World) -> None:
    shards = world.shard_searcher()
    sharded, whole = world.service(shards), world.service(name="whole")
    for query in range(len(QUERIES)):
        for options in (SearchOptions(), SearchOptions(min_score=0.2), SearchOptions(autocut=True)):
            expected = whole.search_text("photos", f"q{query}", k=10, options=options)
            assert ranking(sharded.search_text("photos", f"q{query}", k=10, options=options)) == ranking(expected)
    assert len(shards.searchers) == 4  # 7 segments, two per shard
    assert {query.shard for query in shards.queries} == {0, 1, 2, 3}
    assert world.index.loads == SEGMENTS + 1 + SEGMENTS + 1  # each segment once by the shards, once by `whole`


def test_pages_across_shards_do_not_overlap_and_ties_keep_their_order(world: World) -> None:
    sharded, whole = world.service(world.shard_searcher()), world.service(name="whole")
    pages = [ranking(sharded.search_text("photos", "q5", k=3, options=SearchOptions(offset=offset)))
             for offset in range(0, 30, 3)]
    flat = [hit for page in pages for hit in page]
    assert len({image_id for image_id, _ in flat}) == len(flat) == 30
    assert flat == ranking(whole.search_text("photos", "q5", k=30))
    assert [image_id for image_id, _ in flat[:2]] == [10_000, 10_001]  # the tie, by id


def test_deleted_images_and_filters_are_applied_in_every_shard(world: World) -> None:
    shards = world.shard_searcher()
    sharded, whole = world.service(shards), world.service(name="whole")
    best = [image_id for image_id, _ in ranking(whole.search_text("photos", "q1", k=8))]
    world.catalog.delete_images("photos", best[:4])
    after = ranking(sharded.search_text("photos", "q1", k=8))
    assert not set(best[:4]) & {image_id for image_id, _ in after}
    assert after == ranking(whole.search_text("photos", "q1", k=8))

    prefix = SearchOptions(image_filter=ImageFilter(key_prefix="1"))
    shards.queries.clear()
    filtered = ranking(sharded.search_text("photos", "q1", k=10, options=prefix))
    assert filtered and all(str(image_id).startswith("1") for image_id, _ in filtered)
    assert filtered == ranking(whole.search_text("photos", "q1", k=10, options=prefix))
    assert {query.shard for query in shards.queries} == {0, 1, 2, 3}
    assert all(query.image_filter.key_prefix == "1" for query in shards.queries)


def test_shards_keep_their_segments_loaded_between_queries_and_across_a_new_segment(world: World) -> None:
    shards = world.shard_searcher()
    sharded = world.service(shards)
    sharded.search_text("photos", "q0", k=5)
    loads = world.index.loads
    sharded.search_text("photos", "q1", k=5)
    assert world.index.loads == loads  # warm: nothing fetched again
    held = {number: searcher.loaded_segments for number, searcher in shards.searchers.items()}
    world.publish(SEGMENTS + 1, QUERIES[:3])
    sharded.search_text("photos", "q2", k=5)
    assert world.index.loads == loads + 1  # only the new segment, by the last shard
    assert all(shards.searchers[number].loaded_segments == segments for number, segments in held.items() if number < 3)


class FailingShards:
    def search_shard(self, query: ShardQuery) -> list[tuple[int, float]]:
        raise TransientError(f"shard {query.shard} timed out")


def test_a_shard_that_cannot_answer_fails_the_search_as_transient(world: World) -> None:
    with pytest.raises(TransientError, match="timed out"):
        world.service(FailingShards()).search_text("photos", "q0", k=5)


def test_below_the_budget_nothing_fans_out(world: World) -> None:
    shards = world.shard_searcher()
    roomy = world.service(shards, name="roomy", cache_segments=100)
    assert roomy.search_text("photos", "q0", k=5).hits
    assert shards.queries == []


def test_a_segment_over_the_shard_budget_is_searched_in_the_search_function(world: World) -> None:
    """A segment written before compaction capped them cannot go to a shard: the search answers, not a 500."""
    shards = world.shard_searcher()
    narrow = world.service(shards, name="narrow", shard_segments=0.5)
    whole = world.service(name="whole")
    assert ranking(narrow.search_text("photos", "q1", k=10)) == ranking(whole.search_text("photos", "q1", k=10))
    assert shards.queries == []


def test_the_shard_budgets_follow_the_shard_functions_memory_size() -> None:
    search = Settings.from_env({"CLIPSEARCH_BUCKET": "b", "CLIPSEARCH_MODEL_ID": "m", "CLIPSEARCH_DATABASE_URL": "x",
                                "CLIPSEARCH_SHARD_FUNCTION": "shards", "CLIPSEARCH_SHARD_MEMORY_MB": "2048"})
    assert search.shard_function == "shards"
    assert search.shard_budget_bytes == (2048 - SHARD_RUNTIME_RESERVE_MB) * 2**20
    shard = Settings.from_env({"CLIPSEARCH_BUCKET": "b", "CLIPSEARCH_MODEL_ID": "m", "CLIPSEARCH_DATABASE_URL": "x",
                               "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "2048"})
    assert shard.shard_cache_bytes == search.shard_budget_bytes  # a planned shard fits the searcher's own cache
    assert shard.shard_function is None and shard.shard_budget_bytes == float("inf")


class TestLambdaAdapter:
    """The Lambda adapter against botocore's Stubber (AWS itself is the one thing stubbed)."""

    @staticmethod
    def searcher():
        client = boto3.client("lambda", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
        return LambdaShardSearcher(client, "shards"), Stubber(client)

    @staticmethod
    def query() -> ShardQuery:
        return ShardQuery("d", 1, 2, 0, (SegmentRef("s", "indexes/d/segments/s.faiss", 3, FLAT),), QUERIES[1], 5)

    def test_a_ranking_comes_back_and_the_payload_carries_the_query(self) -> None:
        searcher, stubber = self.searcher()
        answer = json.dumps({"hits": [[7, 0.5], [3, 0.25]]}).encode()
        stubber.add_response("invoke", {"StatusCode": 200, "Payload": StreamingBody(io.BytesIO(answer), len(answer))},
                             {"FunctionName": "shards", "InvocationType": "RequestResponse",
                              "Payload": json.dumps(query_payload(self.query())).encode()})
        with stubber:
            assert searcher.search_shard(self.query()) == [(7, 0.5), (3, 0.25)]

    def test_the_functions_error_and_a_refused_call_are_transient(self) -> None:
        searcher, stubber = self.searcher()
        failure = json.dumps({"errorType": "MemoryError", "errorMessage": "out of memory"}).encode()
        stubber.add_response("invoke", {"StatusCode": 200, "FunctionError": "Unhandled",
                                        "Payload": StreamingBody(io.BytesIO(failure), len(failure))})
        stubber.add_client_error("invoke", "TooManyRequestsException", "Rate exceeded", 429)
        with stubber:
            with pytest.raises(TransientError, match="MemoryError: out of memory"):
                searcher.search_shard(self.query())
            with pytest.raises(TransientError, match="TooManyRequests"):
                searcher.search_shard(self.query())
