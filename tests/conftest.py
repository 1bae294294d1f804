"""Shared fixtures: real services (PostgreSQL, an S3/SQS endpoint over HTTP) and the tiny exported model.

Services come from the environment when `.ci/run` (or a developer) started them:
CLIPSEARCH_TEST_DATABASE_URL and CLIPSEARCH_TEST_AWS_ENDPOINT_URL; otherwise the session starts its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SEED_EVAL = REPO.parent / "shared" / "datasets" / "seed-eval"
MODEL_CACHE = REPO / ".cache" / "models"


@pytest.fixture(scope="session")
def seed_eval_dir() -> Path:
    if not (SEED_EVAL / "train").is_dir():
        pytest.skip(f"seed-eval photos not found at {SEED_EVAL}")
    return SEED_EVAL


@pytest.fixture(scope="session")
def seed_eval_photos(seed_eval_dir: Path) -> list[Path]:
    return sorted((seed_eval_dir / "train").glob("*.jp*g")) + sorted(
        (seed_eval_dir / "val").glob("*.jp*g")
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight CLIP, exported once per session by the real exporter."""
    out = tmp_path_factory.mktemp("models") / "random-tiny-seed0"
    subprocess.run(
        [sys.executable, "-m", "model_export", "--random-arch", "tiny", "--seed", "0", "--out", str(out)],
        check=True,
        cwd=REPO,
    )
    return out


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    url = os.environ.get("CLIPSEARCH_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from clipsearch_tools.local.postgres import start_cluster

    # Outside pytest's basetemp: pytest resets that tree to mode 0700, which locks the server user out.
    home = Path(tempfile.mkdtemp(prefix="clipsearch-test-pg-"))
    cluster = start_cluster(home / "data")
    try:
        yield cluster.url
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database for one test (dropped afterwards)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(postgres_server_url)
    params["dbname"] = name
    yield make_conninfo(**params)
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def aws_endpoint_url() -> Iterator[str]:
    """A real S3 + SQS endpoint over HTTP (moto's server), with bucket notifications."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    url = os.environ.get("CLIPSEARCH_TEST_AWS_ENDPOINT_URL")
    if url:
        yield url
        return
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_client(aws_endpoint_url: str):
    import boto3

    return boto3.client("s3", endpoint_url=aws_endpoint_url, region_name="us-east-1")


@pytest.fixture
def sqs_client(aws_endpoint_url: str):
    import boto3

    return boto3.client("sqs", endpoint_url=aws_endpoint_url, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client) -> str:
    """A fresh bucket for one test."""
    name = f"clipsearch-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name
