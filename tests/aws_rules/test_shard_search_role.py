"""Fan-out under the template's roles, IAM enforced: the shard search function reads only segments and the
catalog; the search function may invoke exactly the shard search function, and the Lambda adapter turns
every refusal or failure into a TransientError (503)."""

from __future__ import annotations

import numpy as np
import pytest
from botocore.exceptions import ClientError
from clipsearch.adapters.lambda_shards import LambdaShardSearcher
from clipsearch.aws import aws_client
from clipsearch.config import Settings
from clipsearch.errors import TransientError
from clipsearch.ports import ShardQuery
from clipsearch.shards import query_payload
from clipsearch.wiring import build_shard_searcher
from aws_world import AwsWorld, jpeg
from http_events import LambdaContext, load_function
from template_roles import REGION
from test_function_roles import assert_all_allowed, ingest, migrated

pytestmark = pytest.mark.aws_rules

CONTEXT = LambdaContext(function_name="clipsearch-aws-rules-shard-search")
SHARD_FUNCTION = "clipsearch-aws-rules-ShardSearchFunction"


def shard_query(world: AwsWorld, dataset: str, vector: np.ndarray) -> ShardQuery:
    from clipsearch.adapters.postgres_catalog import PostgresCatalog
    from clipsearch.adapters.postgres_connection import Database

    database = Database(world.database_url)
    try:
        catalog = PostgresCatalog(database)
        row = catalog.get_dataset(dataset)
        segments = tuple(catalog.live_segments(row.id))
    finally:
        database.close()
    return ShardQuery(dataset, row.id, row.index_version, 0, segments, vector, 3)


def test_the_shard_function_answers_from_segments_and_the_catalog_alone(world: AwsWorld) -> None:
    migrated(world)
    ingest(world, "pets", {f"p{i}.jpg": jpeg(60 + i) for i in range(4)})
    vector = np.zeros(32, np.float32)
    vector[0] = 1.0
    query = shard_query(world, "pets", vector)
    with world.run_as("ShardSearchFunction") as log:
        answer = load_function("shard_search").handler(query_payload(query), CONTEXT)
    assert len(answer["hits"]) == 3
    assert_all_allowed(log, ("GetObject", "indexes/pets/segments/"))
    for key in ("datasets/pets/p0.jpg", f"models/{world.resources.model_id}/manifest.json"):
        with pytest.raises(ClientError) as refused:
            world.client("s3", "ShardSearchFunction").get_object(Bucket=world.resources.bucket, Key=key)
        assert refused.value.response["Error"]["Code"] == "AccessDenied", key


def test_the_search_role_may_invoke_the_shard_function_and_no_other(world: AwsWorld) -> None:
    key_id, secret = world.keys["SearchFunction"]
    client = aws_client("lambda", REGION, world.endpoint, key_id, secret, max_attempts=0)
    query = ShardQuery("pets", 1, 1, 0, (), np.ones(32, np.float32), 3)
    for function, refusal in ((SHARD_FUNCTION, "ResourceNotFound"),  # allowed; moto runs no function
                              ("clipsearch-aws-rules-CompactFunction", "AccessDenied")):
        with pytest.raises(TransientError, match=refusal):
            LambdaShardSearcher(client, function).search_shard(query)
    shard_key = world.keys["ShardSearchFunction"]
    shard_client = aws_client("lambda", REGION, world.endpoint, *shard_key, max_attempts=0)
    with pytest.raises(TransientError, match="AccessDenied"):
        LambdaShardSearcher(shard_client, SHARD_FUNCTION).search_shard(query)


def test_the_search_function_is_wired_to_the_templates_shard_function(world: AwsWorld) -> None:
    with world.run_as("SearchFunction", AWS_ENDPOINT_URL_LAMBDA=world.endpoint):
        settings = Settings.from_env()
        searcher = build_shard_searcher(settings)
    assert isinstance(searcher, LambdaShardSearcher) and searcher.function_name == SHARD_FUNCTION
    assert settings.shard_memory_mb == 2048 and settings.shard_budget_bytes == (2048 - 512) * 2**20
