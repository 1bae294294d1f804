"""S3ObjectStore over a real S3 endpoint: big objects arrive whole as equal parallel ranged GETs; byte ranges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from clipsearch.adapters.s3_store import S3ObjectStore
from botocore.exceptions import ResponseStreamingError
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
        f"bytes={3 * part}-{3 * part + 4}",
    }


def test_a_byte_range_is_one_ranged_get(s3_client, bucket: str) -> None:
    data = os.urandom(4096)
    s3_client.put_object(Bucket=bucket, Key="indexes/photos/segments/small.faiss", Body=data)
    store = S3ObjectStore(s3_client, bucket)

    assert store.get_range("indexes/photos/segments/small.faiss", 100, 1100) == data[100:1100]
    with pytest.raises(ObjectNotFound):
        store.get_range("indexes/photos/segments/gone.faiss", 0, 10)


def test_the_store_downloads_without_importing_s3transfer() -> None:
    """boto3's transfer manager costs ~0.38 s of a cold start to import; the store needs only botocore."""
    completed = subprocess.run(
        [sys.executable, "-c", "import sys, clipsearch.adapters.s3_store; print('s3transfer' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert completed.stdout.strip() == "False"


def test_a_missing_object_is_object_not_found(s3_client, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        S3ObjectStore(s3_client, bucket).download_file("indexes/photos/segments/gone.faiss", tmp_path / "gone")
    assert not (tmp_path / "gone").exists()


def test_a_part_whose_body_breaks_off_is_fetched_again(s3_client, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(20 * 2**20)
    s3_client.put_object(Bucket=bucket, Key="indexes/photos/segments/flaky.faiss", Body=data)
    broken: list[str] = []

    class BreaksOnce:
        """A body that fails after its first chunk, as a reset connection does mid-stream."""

        def __init__(self, body) -> None:
            self._body = body

        def iter_chunks(self, size: int):
            iterator = self._body.iter_chunks(size)
            yield next(iterator)
            raise ResponseStreamingError(error="connection reset by peer")

    def break_the_first_part(parsed, **_) -> None:
        if not broken and "Body" in parsed:
            broken.append(parsed.get("ContentRange", ""))
            parsed["Body"] = BreaksOnce(parsed["Body"])

    s3_client.meta.events.register("after-call.s3.GetObject", break_the_first_part)

    S3ObjectStore(s3_client, bucket).download_file("indexes/photos/segments/flaky.faiss", tmp_path / "flaky.faiss")

    assert len(broken) == 1 and (tmp_path / "flaky.faiss").read_bytes() == data
