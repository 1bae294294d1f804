"""Fan-out for real: a dataset over a lowered budget searched by the template's shard search function, run by the
local function runner (child processes under its MemorySize) against PostgreSQL and the S3 endpoint, answers
exactly as the same data searched whole."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.adapters.lambda_shards import LambdaShardSearcher
from clipsearch.aws import aws_client
from clipsearch.datasets import image_key, segment_key
from clipsearch.errors import TransientError
from clipsearch.ports import ImageInput, IndexedImage, NewImage, NewSegment, SegmentRef, ShardQuery, ShardSearcher
from clipsearch.search import SearchService
from clipsearch.search_results import ImageFilter, SearchOptions
from clipsearch.segments import FLAT, IndexSpec, SegmentVectors
from clipsearch_tools.local.function_environment import FunctionEnvironment
from clipsearch_tools.local.functions import FunctionHost
from clipsearch_tools.local.lambda_api import LocalLambdaApi
from clipsearch_tools.local.shard_invoker import FunctionHostShardSearcher
from clipsearch_tools.local.state import StackState
from clipsearch_tools.local.template import load_template
from search_stack import MODEL_ID, SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SEGMENTS = 3
PER_SEGMENT = 1500  # x the tiny model's 32 dims x 4 bytes: ~200 KB per segment
BUDGET = 300_000  # the search function's: over it at two segments
SHARD_BUDGET = 250_000  # a shard searcher's: one segment each


def publish_segment(stack: SearchStack, dataset: str, number: int, vectors: np.ndarray) -> None:
    """One catalog row per vector (keys a/..., b/..., c/... by segment) and the vectors as one flat segment."""
    row = stack.catalog.ensure_dataset(dataset, MODEL_ID)
    folder = "abc"[number]
    claims = stack.catalog.claim_images(row.id, [
        NewImage(stack.store.bucket, image_key(dataset, f"{folder}/{i:05d}.jpg"), f"etag-{number}-{i}", None, "0" * 64, 100)
        for i in range(len(vectors))
    ])
    ids = np.array([claim.id for claim in claims], dtype=np.int64)
    segment_id = f"{number:04d}-{uuid.uuid4().hex[:8]}"
    segment = NewSegment(segment_id, segment_key(dataset, segment_id), len(ids), FLAT)
    stack.store.put(segment.object_key, FaissVectorIndex().build(SegmentVectors(ids, vectors), IndexSpec(FLAT)))
    stack.catalog.commit_batch(row.id, segment, [IndexedImage(int(i), 64, 64) for i in ids], [])


@pytest.fixture
def shard_host(stack: SearchStack, database_url: str, aws_endpoint_url: str, tmp_path: Path) -> Iterator[FunctionHost]:
    state = StackState(status="ready", home=str(tmp_path), pid=0, log_file=str(tmp_path / "stack.log"),
                       bucket=stack.store.bucket, model_id=MODEL_ID, database_url=database_url,
                       s3_endpoint_url=aws_endpoint_url, sqs_endpoint_url=aws_endpoint_url, queue_url="unused")
    host = FunctionHost(FunctionEnvironment(state), runtime_dir=tmp_path / "functions")
    yield host
    host.stop()


def services(stack: SearchStack, host: FunctionHost, tmp_path: Path,
             shard_searcher: ShardSearcher | None = None) -> tuple[SearchService, SearchService]:
    """(sharded, whole): the same data searched through shard searchers (by default the local runner's
    adapter) and by one search service alone."""
    shard_function = load_template(REPO / "template.yaml").functions["ShardSearchFunction"]
    shard_searcher = shard_searcher or FunctionHostShardSearcher(host, shard_function)

    def service(name: str, fan_out: bool) -> SearchService:
        return SearchService(
            catalog=stack.catalog, store=stack.store, model_id=MODEL_ID,
            text_encoder=lambda: pytest.fail("no text query here"), image_encoder=lambda: stack.encoder,
            max_image_bytes=6 * 1024 * 1024, vector_index=FaissVectorIndex(), segment_dir=tmp_path / name,
            index_cache_bytes=BUDGET, shard_budget_bytes=SHARD_BUDGET,
            shard_searcher=shard_searcher if fan_out else None,
        )

    return service("sharded", True), service("whole", False)


def ranking(result) -> list[tuple[int, float, str]]:
    return [(hit.image_id, hit.score, hit.key) for hit in result.hits]


def test_a_dataset_over_the_budget_answers_through_shard_functions_as_it_does_whole(
    stack: SearchStack, shard_host: FunctionHost, seed_eval_photos: list[Path], database_url: str, tmp_path: Path
) -> None:
    query_photos = [photo.read_bytes() for photo in seed_eval_photos[:3]]
    dim = stack.encoder.embed_images([ImageInput("query", query_photos[0])])[0].vector.shape[0]
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    for number in range(SEGMENTS):
        vectors = centres[rng.integers(0, 20, PER_SEGMENT)] + 0.5 * rng.standard_normal((PER_SEGMENT, dim))
        publish_segment(stack, "big", number, (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32))
    sharded, whole = services(stack, shard_host, tmp_path)
    shard_function = load_template(REPO / "template.yaml").functions["ShardSearchFunction"]

    for photo in query_photos:
        expected = whole.search_image("big", photo, k=10)
        assert len(expected.hits) == 10
        assert ranking(sharded.search_image("big", photo, k=10)) == ranking(expected)
    assert [shard_host.instances(shard_function, f"shard-{n}") for n in range(SEGMENTS)] == [1] * SEGMENTS

    pages = [ranking(sharded.search_image("big", query_photos[0], k=5, options=SearchOptions(offset=offset)))
             for offset in (0, 5, 10, 15)]
    assert [hit for page in pages for hit in page] == ranking(whole.search_image("big", query_photos[0], k=20))

    best = ranking(whole.search_image("big", query_photos[1], k=6))
    for image_id, _, key in best[:3]:
        assert stack.catalog.remove_images("big", key, None) == 1
    after = ranking(sharded.search_image("big", query_photos[1], k=6))
    assert not {image_id for image_id, _, _ in best[:3]} & {image_id for image_id, _, _ in after}
    assert after == ranking(whole.search_image("big", query_photos[1], k=6))

    with psycopg.connect(database_url) as connection:  # segment 1's images are the only recent ones
        connection.execute("UPDATE images SET created_at = now() - interval '2 days' WHERE object_key NOT LIKE %s",
                           ("datasets/big/b/%",))
    for image_filter in (ImageFilter(key_prefix="c/"), ImageFilter(since=datetime.now(UTC) - timedelta(days=1))):
        options = SearchOptions(image_filter=image_filter, min_score=0.0)
        filtered = ranking(sharded.search_image("big", query_photos[2], k=10, options=options))
        folder = "c/" if image_filter.key_prefix else "b/"
        assert filtered and all(key.startswith(f"datasets/big/{folder}") for _, _, key in filtered)
        assert filtered == ranking(whole.search_image("big", query_photos[2], k=10, options=options))


def test_a_shard_function_that_fails_makes_the_search_transient(
    stack: SearchStack, shard_host: FunctionHost, seed_eval_photos: list[Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((PER_SEGMENT, 32)).astype(np.float32)
    publish_segment(stack, "broken", 0, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    publish_segment(stack, "broken", 1, vectors[:10] / np.linalg.norm(vectors[:10], axis=1, keepdims=True))
    second = stack.catalog.live_segments(stack.catalog.get_dataset("broken").id)[1]
    stack.store.put(second.object_key, rng.bytes(200_000))  # not a segment: the shard function fails to open it
    sharded, _ = services(stack, shard_host, tmp_path)
    with pytest.raises(TransientError, match="shard 1"):
        sharded.search_image("broken", seed_eval_photos[0].read_bytes(), k=5)


def test_the_lambda_adapter_through_the_local_lambda_api_answers_the_same(
    stack: SearchStack, shard_host: FunctionHost, seed_eval_photos: list[Path], tmp_path: Path
) -> None:
    """The search function's own adapter (boto3 invoke) against the local stack's Lambda API."""
    rng = np.random.default_rng(2)
    for number in range(2):
        vectors = rng.standard_normal((PER_SEGMENT, 32)).astype(np.float32)
        publish_segment(stack, "viaapi", number, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    template = load_template(REPO / "template.yaml")
    api = LocalLambdaApi(template.functions, shard_host.invoke)
    url = api.start()
    try:
        client = aws_client("lambda", "us-east-1", url, "local", "local", max_attempts=0)
        sharded, whole = services(stack, shard_host, tmp_path, LambdaShardSearcher(client, "ShardSearchFunction"))
        photo = seed_eval_photos[0].read_bytes()
        assert ranking(sharded.search_image("viaapi", photo, k=10)) == ranking(whole.search_image("viaapi", photo, k=10))
        with pytest.raises(TransientError, match="ResourceNotFound"):
            LambdaShardSearcher(client, "NoSuchFunction").search_shard(
                ShardQuery("viaapi", 1, 1, 0, (), np.ones(32, np.float32), 3))
        missing = SegmentRef("x", "indexes/viaapi/segments/x.faiss", 1, FLAT)
        with pytest.raises(TransientError, match="Unhandled"):  # the handler's own failure
            LambdaShardSearcher(client, "ShardSearchFunction").search_shard(
                ShardQuery("viaapi", 1, 1, 0, (missing,), np.ones(32, np.float32), 3))
    finally:
        api.stop()
