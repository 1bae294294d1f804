"""S3ObjectStore.download_file over a real S3 endpoint: big objects arrive whole as equal parallel ranged GETs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clipsearch.adapters.s3_store import S3ObjectStore
from clipsearch.errors import ObjectNotFound

pytestmark = pytest.mark.integration


def test_a_big_object_arrives_whole_in_parallel_ranged_gets(s3_client, bucket: str, tmp_path: Path) -> None:
    ranges: list[str] = []
    s3_client.meta.events.register(
        "before-call.s3.GetObject", lambda params, **_: ranges.append(params["headers"].get("Range", "whole"))
    )
    data = os.urandom(24 * 2**20 + 5)  # an eighth is under the 8 MiB minimum part: three parts of 8 MiB and 5 bytes
    s3_client.put_object(Bucket=bucket, Key="indexes/photos/segments/big.faiss", Body=data)

    S3ObjectStore(s3_client, bucket).download_file("indexes/photos/segments/big.faiss", tmp_path / "big.faiss")

    assert (tmp_path / "big.faiss").read_bytes() == data
    part = 8 * 2**20
    assert len(ranges) == 4 and set(ranges) == {
        *(f"bytes={start}-{start + part - 1}" for start in range(0, 3 * part, part)),
        f"bytes={3 * part}-",  # s3transfer leaves the last range open
    }


def test_a_missing_object_is_object_not_found(s3_client, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        S3ObjectStore(s3_client, bucket).download_file("indexes/photos/segments/gone.faiss", tmp_path / "gone")
    assert not (tmp_path / "gone").exists()
