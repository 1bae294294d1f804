"""The search and dataset functions wired from the environment, as in Lambda, against the test services."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from clipsearch import wiring
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
from clipsearch.adapters.s3_store import S3ObjectStore
from clipsearch.datasets import image_key, model_prefix
from clipsearch.encoders import OnnxImageEncoder
from clipsearch.events import EventKind, ObjectEvent
from clipsearch.ingest import SOURCE_PATH_METADATA, IngestReport, IngestService
from clipsearch.model_files import ModelFiles
from http_events import http_event, invoke, load_function

MODEL_ID = "random-tiny-seed0"


@dataclass
class SearchStack:
    catalog: PostgresCatalog
    store: S3ObjectStore
    encoder: OnnxImageEncoder
    search: ModuleType
    datasets: ModuleType
    model_cache_dir: Path
    photo_root: Path
    deletion_queue_url: str = ""  # the datasets function queues its deletion tasks here

    def index(self, dataset: str, photos: list[Path], with_source_paths: bool = True) -> IngestReport:
        """Uploads `photos` to datasets/<dataset>/ and ingests them as one batch (one segment, one commit),
        through the ingestion service itself, without the queue. With source paths, each image records
        its path under `photo_root`, as the CLI does."""
        events = []
        for photo in photos:
            key = image_key(dataset, photo.name)
            metadata = {SOURCE_PATH_METADATA: str(self.photo_root / photo.name)} if with_source_paths else None
            etag = self.store.put(key, photo.read_bytes(), metadata=metadata, content_type="image/jpeg")
            events.append(ObjectEvent(f"upload-{key}", EventKind.CREATED, self.store.bucket, key, dataset, etag))
        report = IngestService(self.store, self.catalog, self.encoder, MODEL_ID, FaissVectorIndex()).ingest(events)
        assert not report.retry, report.retry
        return report

    def call(self, function: ModuleType, fixture: str, **event) -> tuple[int, dict]:
        return invoke(function, http_event(fixture, **event))


def clear_wiring() -> None:
    for factory in vars(wiring).values():
        if hasattr(factory, "cache_clear"):
            factory.cache_clear()


def upload_model(s3_client, bucket: str, model_dir: Path) -> None:
    for path in sorted(model_dir.rglob("*")):
        relative = path.relative_to(model_dir).as_posix()
        if path.is_file() and not path.name.startswith("."):
            s3_client.upload_file(str(path), bucket, model_prefix(MODEL_ID) + relative)


@pytest.fixture(name="stack")
def stack_fixture(
    database_url: str,
    aws_endpoint_url: str,
    s3_client,
    sqs_client,
    bucket: str,
    tiny_model_dir: Path,
    seed_eval_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[SearchStack]:
    upload_model(s3_client, bucket, tiny_model_dir)
    deletion_queue_url = sqs_client.create_queue(QueueName=f"deletions-{bucket}")["QueueUrl"]
    environment = {
        "CLIPSEARCH_SQS_ENDPOINT_URL": aws_endpoint_url,
        "CLIPSEARCH_DELETION_QUEUE_URL": deletion_queue_url,
        "CLIPSEARCH_BUCKET": bucket,
        "CLIPSEARCH_MODEL_ID": MODEL_ID,
        "CLIPSEARCH_DATABASE_URL": database_url,
        "CLIPSEARCH_S3_ENDPOINT_URL": aws_endpoint_url,
        "CLIPSEARCH_MODEL_CACHE_DIR": str(tmp_path / "models"),
        "CLIPSEARCH_SEGMENT_DIR": str(tmp_path / "segments"),
        "AWS_REGION": "us-east-1",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    clear_wiring()
    migrate(wiring.get_database())
    yield SearchStack(
        catalog=PostgresCatalog(wiring.get_database()),
        store=wiring.get_object_store(),
        encoder=OnnxImageEncoder.from_model_files(ModelFiles.open(tiny_model_dir)),
        search=load_function("search"),
        datasets=load_function("datasets"),
        model_cache_dir=tmp_path / "models",
        photo_root=Path("/home/user/photos"),
        deletion_queue_url=deletion_queue_url,
    )
    wiring.get_database().close()
    clear_wiring()
