"""The search function's role reads segments in ranges (a cold query's partial load): S3ObjectStore.get_range
signs each read with the role's keys, as Lambda's role would; GetObject covers ranged reads."""

from __future__ import annotations

import pytest
from clipsearch.adapters.s3_store import S3ObjectStore
from clipsearch.aws import aws_client
from clipsearch.errors import ObjectNotFound, TransientError
from aws_world import REGION, AwsWorld


def test_the_search_role_reads_a_segment_range_and_nothing_outside_its_grant(world: AwsWorld) -> None:
    data = bytes(range(256)) * 4096
    world.upload("indexes/pets/segments/s1.faiss", data)
    world.upload("other/secret.bin", data)
    key_id, secret = world.keys["SearchFunction"]
    client = aws_client("s3", REGION, world.endpoint, key_id, secret)  # as the function's wiring builds it (SigV4)
    store = S3ObjectStore(client, world.resources.bucket)

    assert store.get_range("indexes/pets/segments/s1.faiss", 1000, 70_000) == data[1000:70_000]
    with pytest.raises((TransientError, ObjectNotFound)):  # refused (403), never served
        store.get_range("other/secret.bin", 0, 10)
