"""The clients the functions build as they start: botocore without boto3, one session whose events reach every
client, models read without listing every service, and a shard searcher whose Lambda client waits for the first
fan-out."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import UnknownServiceError
from botocore.response import StreamingBody
from botocore.stub import Stubber
from clipsearch import aws
from clipsearch.adapters.lambda_shards import LambdaShardSearcher
from clipsearch.aws import aws_client
from clipsearch.ports import SegmentRef, ShardQuery
from clipsearch.segments import FLAT

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

# The search function's module as Lambda imports it, its init threads pointed at closed ports; then every
# top-level package imported by the time the module was ready.
_IMPORT_SEARCH_FUNCTION = """
import json, sys
sys.path.insert(0, "functions/search")
import app
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def test_the_search_function_starts_without_boto3() -> None:
    environment = {
        "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "shared"), "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1", "CLIPSEARCH_BUCKET": "images",
        "CLIPSEARCH_MODEL_ID": "tiny", "CLIPSEARCH_DATABASE_URL": "postgresql://127.0.0.1:1/catalog",
        "CLIPSEARCH_S3_ENDPOINT_URL": "http://127.0.0.1:1", "POWERTOOLS_METRICS_DISABLED": "true",
        "CLIPSEARCH_SHARD_FUNCTION": "shards",
    }
    result = subprocess.run([sys.executable, "-c", _IMPORT_SEARCH_FUNCTION], env=environment, cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    imported = set(json.loads(result.stdout.splitlines()[-1]))
    assert "botocore" in imported and "onnxruntime" in imported  # the module did start its init
    assert not imported & {"boto3", "s3transfer"}


def test_service_models_load_from_their_directories_and_unknown_services_still_fail() -> None:
    client = aws_client("s3", "us-east-1", "http://127.0.0.1:9", "key", "secret")
    assert client.meta.service_model.api_version == "2006-03-01"
    assert client.can_paginate("list_objects_v2")
    with pytest.raises(UnknownServiceError):
        aws_client("no-such-service", "us-east-1")


def test_the_sessions_events_reach_its_clients_until_it_is_forgotten() -> None:
    seen: list[str] = []
    aws.forget_session()
    try:
        aws.aws_session().register("provide-client-params", lambda model, **_: seen.append(model.name))
        client = aws_client("s3", "us-east-1", "http://127.0.0.1:9", "key", "secret")
        with Stubber(client) as stubber:
            stubber.add_response("list_buckets", {"Buckets": []})
            client.list_buckets()
        assert seen == ["ListBuckets"]
        aws.forget_session()
        later = aws_client("s3", "us-east-1", "http://127.0.0.1:9", "key", "secret")
        with Stubber(later) as stubber:
            stubber.add_response("list_buckets", {"Buckets": []})
            later.list_buckets()
        assert seen == ["ListBuckets"]
    finally:
        aws.forget_session()


def test_the_shard_searchers_lambda_client_is_built_by_the_first_fan_out_once() -> None:
    built = []

    def build_client():
        client = aws_client("lambda", "us-east-1", None, "key", "secret")
        stubber = Stubber(client)
        for _ in range(2):
            answer = json.dumps({"hits": [[7, 0.5]]}).encode()
            stubber.add_response("invoke", {"StatusCode": 200, "Payload": StreamingBody(io.BytesIO(answer), len(answer))})
        stubber.activate()
        built.append(client)
        return client

    searcher = LambdaShardSearcher.connecting_on_first_use(build_client, "shards")
    assert built == []
    query = ShardQuery("d", 1, 2, 0, (SegmentRef("s", "indexes/d/segments/s.faiss", 3, FLAT),), np.ones(4, np.float32), 5)
    assert searcher.search_shard(query) == [(7, 0.5)]
    assert searcher.search_shard(query) == [(7, 0.5)]
    assert len(built) == 1
