"""The one place that builds real adapters and services from Settings, once per execution environment.

Handlers call these factories; tests build services from adapters directly.
"""

from __future__ import annotations

from functools import lru_cache

import boto3
from botocore.config import Config

from clipsearch.adapters.postgres_connection import Database, conninfo_from_secret
from clipsearch.adapters.s3_store import S3ObjectStore
from clipsearch.config import Settings

_BOTO_CONFIG = Config(retries={"max_attempts": 5, "mode": "adaptive"}, max_pool_connections=32)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()


def aws_client(service: str, settings: Settings):
    """Every boto3 client is built here, pointed at the local endpoint when one is configured."""
    endpoint = settings.sqs_endpoint_url if service == "sqs" else settings.s3_endpoint_url
    if service == "secretsmanager":
        endpoint = None
    return boto3.client(service, region_name=settings.region, endpoint_url=endpoint, config=_BOTO_CONFIG)


def build_object_store(settings: Settings) -> S3ObjectStore:
    return S3ObjectStore(aws_client("s3", settings), settings.bucket)


def build_database(settings: Settings) -> Database:
    if settings.database_url:
        return Database(settings.database_url)

    def from_secret() -> str:
        secret = aws_client("secretsmanager", settings).get_secret_value(SecretId=settings.db_secret_arn)
        return conninfo_from_secret(secret["SecretString"])

    return Database(from_secret)


@lru_cache(maxsize=1)
def get_object_store() -> S3ObjectStore:
    return build_object_store(get_settings())


@lru_cache(maxsize=1)
def get_database() -> Database:
    return build_database(get_settings())
