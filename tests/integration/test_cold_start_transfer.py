"""S3 clients from clipsearch.aws (botocore, no boto3 at start) still upload and download with boto3's managed transfers."""

from __future__ import annotations

from pathlib import Path

import pytest
from clipsearch.aws import aws_client

pytestmark = pytest.mark.integration


def test_s3_clients_keep_boto3s_transfer_methods(aws_endpoint_url: str, bucket: str, tmp_path: Path) -> None:
    client = aws_client("s3", "us-east-1", aws_endpoint_url, "key", "secret")
    source = tmp_path / "segment.bin"
    source.write_bytes(bytes(range(256)) * 300)
    client.upload_file(str(source), bucket, "indexes/d/segment.bin")
    copy = tmp_path / "copy.bin"
    client.download_file(bucket, "indexes/d/segment.bin", str(copy))
    assert copy.read_bytes() == source.read_bytes()
    assert not hasattr(aws_client("sqs", "us-east-1", aws_endpoint_url, "key", "secret"), "upload_file")
