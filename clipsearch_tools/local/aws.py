"""The one place the CLI and the local stack build boto3 clients (the Lambda functions use `wiring.aws_client`)."""

from __future__ import annotations

import boto3
from botocore.config import Config


def aws_client(
    service: str,
    region: str,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    max_attempts: int = 5,
):
    """A client for `service`; without an endpoint and keys it is AWS itself with the default credentials."""
    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, max_pool_connections=32)
    return boto3.client(
        service, region_name=region, endpoint_url=endpoint_url, config=config,
        aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
    )


def default_credentials():
    """The frozen default AWS credentials (environment, profile, instance role), or None when there are none."""
    credentials = boto3.Session().get_credentials()
    return None if credentials is None else credentials.get_frozen_credentials()
