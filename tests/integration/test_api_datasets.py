"""The datasets function driven with HTTP API v2 events (list, describe, delete: 202), and the deletion worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from clipsearch import dataset_service, wiring
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.adapters.postgres_catalog import PostgresCatalog
from clipsearch.adapters.s3_store import S3ObjectStore
from clipsearch.adapters.sqs_queue import SqsQueue
from clipsearch.dataset_service import DatasetService, DeletionOutcome, parse_task_message
from clipsearch.events import EventKind, ObjectEvent
from clipsearch.ingest import IngestService
from http_events import EVENTS, FUNCTIONS, LambdaContext, http_event, load_function
from search_stack import MODEL_ID, SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration


def bucket_keys(stack: SearchStack, prefix: str) -> set[str]:
    return {info.key for info in stack.store.list(prefix)}


def test_list_and_describe_datasets(stack: SearchStack, seed_eval_photos: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    stack.index("alpha", seed_eval_photos[:3] + [broken])
    stack.index("beta", seed_eval_photos[3:5])

    status, listing = stack.call(stack.datasets, "list_datasets")
    detail_status, alpha = stack.call(stack.datasets, "get_dataset", dataset="alpha")

    assert status == 200 and [entry["name"] for entry in listing["datasets"]] == ["alpha", "beta"]
    beta = listing["datasets"][1]
    assert beta["model"] == MODEL_ID and beta["index_version"] == 1
    assert beta["counts"] == {"pending": 0, "indexed": 2, "failed": 0, "deleted": 0}
    assert detail_status == 200
    assert alpha["counts"] == {"pending": 0, "indexed": 3, "failed": 1, "deleted": 0}
    assert [failure["key"] for failure in alpha["recent_failures"]] == ["datasets/alpha/broken.jpg"]
    assert "not a recognizable image" in alpha["recent_failures"][0]["reason"]
    assert alpha["updated_at"] >= alpha["created_at"]


class WorkerContext:
    """The Lambda context the deletion worker reads its remaining time from."""

    function_name = "clipsearch-dataset-deletion"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:clipsearch-dataset-deletion"
    aws_request_id = "00000000-0000-0000-0000-000000000001"

    def __init__(self, remaining_ms: int = 900_000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def take_tasks(sqs_client, queue_url: str) -> dict:
    """The deletion queue's messages as one Lambda SQS event, removed from the queue as Lambda would on success."""
    records = []
    while messages := sqs_client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages"):
        for message in messages:
            records.append({"messageId": message["MessageId"], "receiptHandle": message["ReceiptHandle"],
                            "body": message["Body"], "eventSource": "aws:sqs"})
            sqs_client.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return {"Records": records}


def test_delete_answers_202_then_the_worker_removes_images_thumbnails_segments_and_rows(
    stack: SearchStack, sqs_client, seed_eval_photos: list[Path]
) -> None:
    stack.index("alpha", seed_eval_photos[:3])
    stack.index("alpha", seed_eval_photos[3:5])
    stack.index("beta", seed_eval_photos[5:7])
    stack.store.put("datasets/alpha/not-yet-ingested.jpg", seed_eval_photos[7].read_bytes())
    assert stack.call(stack.search, "search_text", dataset="alpha", body={"query": "x"})[0] == 200  # warm cache

    response = stack.datasets.handler(http_event("delete_dataset", dataset="alpha"), LambdaContext())
    accepted = json.loads(response["body"])

    assert response["statusCode"] == 202 and response["headers"]["Location"] == "/datasets/alpha", response
    assert (accepted["dataset"], accepted["status"], accepted["location"]) == ("alpha", "deleting", "/datasets/alpha")
    assert accepted["deletion"]["objects_deleted"] == 0
    assert len(bucket_keys(stack, "datasets/alpha/")) == 6  # nothing deleted inside the API call
    status, shown = stack.call(stack.datasets, "get_dataset", dataset="alpha")
    assert (status, shown["status"], shown["counts"]["indexed"]) == (200, "deleting", 5)
    search_status, body = stack.call(stack.search, "search_text", dataset="alpha", body={"query": "x"})
    assert (search_status, body["error"]["code"]) == (409, "dataset_deleting")
    again_status, again = stack.call(stack.datasets, "delete_dataset", dataset="alpha")
    assert (again_status, again["status"]) == (202, "deleting")  # idempotent
    listed = {entry["name"]: entry["status"] for entry in stack.call(stack.datasets, "list_datasets")[1]["datasets"]}
    assert listed == {"alpha": "deleting", "beta": "active"}

    tasks = take_tasks(sqs_client, stack.deletion_queue_url)
    answer = load_function("dataset_deletion").handler(tasks, WorkerContext())

    # The second task (the repeated DELETE) finds the dataset gone.
    assert answer == {"tasks": [{"dataset": "alpha", "outcome": "finished"}, {"dataset": "alpha", "outcome": "skipped"}]}
    assert bucket_keys(stack, "datasets/alpha/") == set() and bucket_keys(stack, "indexes/alpha/") == set()
    assert bucket_keys(stack, "thumbnails/alpha/") == set()
    assert len(bucket_keys(stack, "datasets/beta/")) == 2 and len(bucket_keys(stack, "indexes/beta/")) == 1
    assert len(bucket_keys(stack, "thumbnails/beta/")) == 2
    assert stack.call(stack.datasets, "get_dataset", dataset="alpha")[0] == 404
    search_status, body = stack.call(stack.search, "search_text", dataset="alpha", body={"query": "x"})
    assert (search_status, body["error"]["code"]) == (404, "dataset_not_found")
    assert stack.call(stack.search, "search_text", dataset="beta", body={"query": "x"})[0] == 200
    assert stack.call(stack.datasets, "delete_dataset", dataset="alpha")[0] == 404


class StoreKilledAfterFirstPage(S3ObjectStore):
    """The worker's process dies after its first page of deletions, as it starts the second."""

    def __init__(self, store: S3ObjectStore) -> None:
        super().__init__(store._client, store.bucket)
        self.pages = 0

    def delete_many(self, keys) -> None:
        self.pages += 1
        if self.pages == 2:
            raise SystemExit("worker killed")
        super().delete_many(keys)


def test_a_worker_killed_after_its_first_page_is_resumed_and_finishes(
    stack: SearchStack, sqs_client, seed_eval_photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.index("alpha", seed_eval_photos[:3])
    assert stack.call(stack.datasets, "delete_dataset", dataset="alpha")[0] == 202
    monkeypatch.setattr(dataset_service, "OBJECT_PAGE", 2)  # several pages from a few images
    catalog = PostgresCatalog(wiring.get_database())
    queue = SqsQueue(sqs_client, stack.deletion_queue_url)
    dying = DatasetService(catalog, StoreKilledAfterFirstPage(stack.store), queue)
    [task] = [parse_task_message(record["body"]) for record in take_tasks(sqs_client, stack.deletion_queue_url)["Records"]]

    with pytest.raises(SystemExit):
        dying.continue_deletion(task, lambda: True)

    # The user sees only 'deleting', with the progress made: 2 objects of 7 (3 images, 3 thumbnails, 1 segment).
    status, shown = stack.call(stack.datasets, "get_dataset", dataset="alpha")
    assert (status, shown["status"], shown["deletion"]["objects_deleted"]) == (200, "deleting", 2)
    assert len(bucket_keys(stack, "datasets/alpha/")) == 1
    survivor = DatasetService(catalog, stack.store, queue)
    assert survivor.continue_deletion(task, lambda: True) is DeletionOutcome.SKIPPED  # the dead worker's lease
    with psycopg.connect(stack_database_url(stack)) as connection:  # its lease runs out
        connection.execute("UPDATE datasets SET deletion_lease_until = now() - interval '1 second'")

    assert survivor.continue_deletion(task, lambda: True) is DeletionOutcome.FINISHED

    for prefix in ("datasets/alpha/", "indexes/alpha/", "thumbnails/alpha/"):
        assert bucket_keys(stack, prefix) == set()
    assert stack.call(stack.datasets, "get_dataset", dataset="alpha")[0] == 404
    with psycopg.connect(stack_database_url(stack)) as connection:
        assert connection.execute("SELECT count(*) FROM images").fetchone() == (0,)
        assert connection.execute("SELECT count(*) FROM segments").fetchone() == (0,)


def test_a_worker_out_of_time_queues_the_rest_and_the_sweep_resumes_a_lost_task(
    stack: SearchStack, sqs_client, seed_eval_photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.index("alpha", seed_eval_photos[:2])
    assert stack.call(stack.datasets, "delete_dataset", dataset="alpha")[0] == 202
    worker = load_function("dataset_deletion")

    out_of_time = worker.handler(take_tasks(sqs_client, stack.deletion_queue_url), WorkerContext(remaining_ms=1_000))

    assert out_of_time == {"tasks": [{"dataset": "alpha", "outcome": "unfinished"}]}
    assert len(take_tasks(sqs_client, stack.deletion_queue_url)["Records"]) == 1  # the rest, queued again
    # That message is lost: the schedule's sweep finds the deletion without a worker and finishes it.
    monkeypatch.setattr(dataset_service, "STALLED_AFTER", timedelta(0))
    swept = worker.handler(json.loads((EVENTS / "scheduled.json").read_text()), WorkerContext())

    assert swept == {"resumed": ["alpha"]}
    assert bucket_keys(stack, "datasets/alpha/") == set() and bucket_keys(stack, "thumbnails/alpha/") == set()
    assert stack.call(stack.datasets, "get_dataset", dataset="alpha")[0] == 404


def test_uploads_into_a_deleting_dataset_wait_and_then_start_a_new_one(
    stack: SearchStack, sqs_client, seed_eval_photos: list[Path]
) -> None:
    stack.index("alpha", seed_eval_photos[:2])
    assert stack.call(stack.datasets, "delete_dataset", dataset="alpha")[0] == 202
    time.sleep(1.1)  # S3 lists LastModified to the second: an upload in the same second goes with the dataset
    key = "datasets/alpha/late.jpg"
    etag = stack.store.put(key, seed_eval_photos[2].read_bytes())
    upload = ObjectEvent("late", EventKind.CREATED, stack.store.bucket, key, "alpha", etag)
    ingest = IngestService(stack.store, stack.catalog, stack.encoder, MODEL_ID, FaissVectorIndex())

    waiting = ingest.ingest([upload])

    assert set(waiting.retry) == {"late"}  # retried by the queue, not recorded in the dataset that is going
    load_function("dataset_deletion").handler(take_tasks(sqs_client, stack.deletion_queue_url), WorkerContext())
    assert bucket_keys(stack, "datasets/alpha/") == {key}  # uploaded after the DELETE: kept
    later = ingest.ingest([upload])  # the queue's next delivery, once the dataset is gone

    assert later.retry == {}
    status, shown = stack.call(stack.datasets, "get_dataset", dataset="alpha")
    assert (status, shown["status"], shown["counts"]["indexed"]) == (200, "active", 1)  # a new dataset, one image


def test_delete_removes_the_objects_of_a_dataset_without_catalog_rows(
    stack: SearchStack, sqs_client, seed_eval_photos: list[Path]
) -> None:
    stack.index("alpha", seed_eval_photos[:2])
    stack.catalog.remove_dataset("alpha")  # images left behind, as the former delete order could leave them

    status, accepted = stack.call(stack.datasets, "delete_dataset", dataset="alpha")
    load_function("dataset_deletion").handler(take_tasks(sqs_client, stack.deletion_queue_url), WorkerContext())

    assert (status, accepted["status"]) == (202, "deleting")
    assert bucket_keys(stack, "datasets/alpha/") == set() and bucket_keys(stack, "indexes/alpha/") == set()
    assert bucket_keys(stack, "thumbnails/alpha/") == set()
    assert stack.call(stack.datasets, "get_dataset", dataset="alpha")[0] == 404


def stack_database_url(stack: SearchStack) -> str:
    return wiring.get_settings().database_url


def test_the_datasets_function_imports_neither_faiss_nor_onnxruntime() -> None:
    # Its cold start pays only for what listing and deleting need.
    handler = str(FUNCTIONS / "datasets" / "app.py")
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('datasets_app', {handler!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted({'faiss', 'onnxruntime', 'clipsearch.http.routes'} & set(sys.modules)))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert loaded.strip() == "['clipsearch.http.routes']"


@pytest.mark.parametrize("fixture", ["get_dataset", "delete_dataset"])
def test_unknown_and_invalid_datasets(stack: SearchStack, fixture: str) -> None:
    status, body = stack.call(stack.datasets, fixture, dataset="missing")
    assert (status, body["error"]["code"]) == (404, "dataset_not_found")
    status, body = stack.call(stack.datasets, fixture, dataset="-invalid")
    assert (status, body["error"]["code"]) == (400, "invalid_request")


def test_datasets_function_serves_its_openapi_document_and_404s_unknown_routes(stack: SearchStack) -> None:
    status, document = stack.call(stack.datasets, "get_openapi")
    assert status == 200
    assert set(document["paths"]) == {"/datasets", "/datasets/{dataset}"}
    assert set(document["paths"]["/datasets/{dataset}"]) == {"get", "delete"}
    status, body = stack.call(stack.datasets, "unknown_route")
    assert (status, body["error"]["code"]) == (404, "route_not_found")
