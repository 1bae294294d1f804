"""The one place boto3 clients are built: by the functions' wiring, the CLI, the local stack and the benchmarks."""

from __future__ import annotations

import boto3
from botocore.config import Config

DEFAULT_MAX_ATTEMPTS = 5  # retries after the first try (botocore's `max_attempts`), with standard-mode backoff
MAX_POOL_CONNECTIONS = 32  # concurrent segment and model downloads, concurrent uploads from the CLI


def aws_client(
    service: str,
    region: str,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeouts: tuple[float, float] | None = None,
):
    """A client for `service` with standard-mode retries; `timeouts` (connect, read) in seconds replace
    botocore's 60 s each.

    Without `endpoint_url`, botocore's own endpoint configuration applies (AWS_ENDPOINT_URL_<SERVICE>,
    AWS_ENDPOINT_URL, the profile's), else AWS itself; without keys, the default credential chain
    (environment, profile, the function's role).
    """
    # Presigned S3 URLs in SigV4 (scoped to one region, valid 7 days at most), never the legacy SigV2
    # that botocore may still choose for some S3 endpoints.
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"}, max_pool_connections=MAX_POOL_CONNECTIONS,
        signature_version="s3v4" if service == "s3" else None,
        **({"connect_timeout": timeouts[0], "read_timeout": timeouts[1]} if timeouts else {}),
    )
    return boto3.client(
        service, region_name=region, endpoint_url=endpoint_url, config=config,
        aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
    )


def default_credentials():
    """The frozen default AWS credentials (environment, profile, instance role), or None when there are none."""
    credentials = boto3.Session().get_credentials()
    return None if credentials is None else credentials.get_frozen_credentials()
