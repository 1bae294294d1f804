"""The one boto3 client factory: standard retries everywhere; the functions' s3/sqs follow the settings, the rest botocore."""

from __future__ import annotations

import pytest
from clipsearch.aws import DEFAULT_MAX_ATTEMPTS, aws_client
from clipsearch.config import Settings
from clipsearch.wiring import service_client

pytestmark = pytest.mark.unit

ENVIRONMENT = {
    "CLIPSEARCH_BUCKET": "images",
    "CLIPSEARCH_MODEL_ID": "tiny",
    "CLIPSEARCH_DATABASE_URL": "postgresql://127.0.0.1/catalog",
    "CLIPSEARCH_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
    "CLIPSEARCH_SQS_ENDPOINT_URL": "http://127.0.0.1:9324",
    "AWS_DEFAULT_REGION": "eu-west-1",
}


@pytest.fixture
def settings() -> Settings:
    return Settings.from_env(ENVIRONMENT)


def test_the_factory_retries_in_standard_mode_with_the_given_attempts():
    client = aws_client("s3", "us-east-1", "http://127.0.0.1:9000", "key", "secret", max_attempts=2)
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert client.meta.endpoint_url == "http://127.0.0.1:9000"
    default = aws_client("sqs", "us-east-1", "http://127.0.0.1:9324", "key", "secret")
    assert default.meta.config.retries["total_max_attempts"] == DEFAULT_MAX_ATTEMPTS + 1


@pytest.mark.parametrize("service, endpoint", [("s3", "http://127.0.0.1:9000"), ("sqs", "http://127.0.0.1:9324")])
def test_functions_send_s3_and_sqs_to_the_configured_endpoints(settings: Settings, service: str, endpoint: str):
    client = service_client(service, settings)
    assert client.meta.endpoint_url == endpoint
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.config.retries["mode"] == "standard"


def test_other_services_take_botocores_own_endpoint_configuration(settings: Settings, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", "http://127.0.0.1:4566")
    assert service_client("secretsmanager", settings).meta.endpoint_url == "http://127.0.0.1:4566"
    monkeypatch.delenv("AWS_ENDPOINT_URL_SECRETS_MANAGER")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert service_client("secretsmanager", settings).meta.endpoint_url == "https://secretsmanager.eu-west-1.amazonaws.com"
