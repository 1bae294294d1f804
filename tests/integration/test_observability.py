"""Every function, run in its own process as in Lambda, writes only JSON to stdout: log lines with the request
and correlation ids (the runtime modules' INFO lines among them) and EMF metrics under the chosen names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from http_events import EVENTS, http_event
from ingest_stack import CONTEXT, ingest_stack, preprocess_function
from search_stack import MODEL_ID, upload_model

pytestmark = pytest.mark.integration
__all__ = ["ingest_stack"]

FUNCTION_PROCESS = Path(__file__).resolve().parent / "function_process.py"
FUNCTIONS = FUNCTION_PROCESS.parents[2] / "functions"
DATASET = "photos"


@dataclass
class Run:
    """What one execution environment printed and answered."""

    answers: list
    tracing_enabled: bool
    logs: list[dict]  # the Powertools log lines
    metrics: list[dict]  # the EMF documents
    stderr: str

    def logs_of(self, logger_name: str) -> list[dict]:
        return [line for line in self.logs if line.get("name") == logger_name]

    def metric_values(self, name: str) -> list[float]:
        """Every value of the metric `name`, in the order the invocations emitted them."""
        values = []
        for document in self.metrics:
            if name in document:
                value = document[name]
                values.extend(value if isinstance(value, list) else [value])
        return values

    def metrics_of(self, request_id: str) -> dict:
        """The application metrics (name -> value) the invocation `request_id` emitted."""
        [document] = [d for d in self.metrics if d.get("function_request_id") == request_id]
        names = [m["Name"] for d in document["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]]
        return {name: _single(document[name]) for name in names}


def _single(value):
    """EMF holds a metric's value as a number or, when it was added several times, a list."""
    if isinstance(value, list):
        assert len(value) == 1, value
        return value[0]
    return value


def run_function(function: str, events: list[dict], environment: dict[str, str], tmp_path: Path) -> Run:
    """A fresh process per call, in Lambda's shape: LAMBDA_TASK_ROOT set, so Powertools traces as in Lambda
    (no X-Ray daemon listens here: the SDK discards the segments, as the local runner's instances would)."""
    events_path, answers_path = tmp_path / f"{function}-events.json", tmp_path / f"{function}-answers.json"
    events_path.write_text(json.dumps(events))
    result = subprocess.run(
        [sys.executable, str(FUNCTION_PROCESS), function, str(events_path), str(answers_path)],
        env={**os.environ, **environment, "LAMBDA_TASK_ROOT": str(FUNCTIONS / function), "LOG_LEVEL": "INFO"},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    documents = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON
    answers = json.loads(answers_path.read_text())
    return Run(
        answers=answers["answers"],
        tracing_enabled=answers["tracing_enabled"],
        logs=[d for d in documents if "_aws" not in d],
        metrics=[d for d in documents if "_aws" in d],
        stderr=result.stderr,
    )


@pytest.fixture
def environment(ingest_stack, aws_endpoint_url: str, tiny_model_dir: Path, tmp_path: Path) -> dict[str, str]:
    """The functions' settings for the ingest stack, with the tiny model published to its bucket."""
    upload_model(ingest_stack.s3, ingest_stack.bucket, tiny_model_dir)
    assert ingest_stack.model_id == MODEL_ID
    return {
        "CLIPSEARCH_BUCKET": ingest_stack.bucket,
        "CLIPSEARCH_MODEL_ID": MODEL_ID,
        "CLIPSEARCH_DATABASE_URL": ingest_stack.database_url,
        "CLIPSEARCH_S3_ENDPOINT_URL": aws_endpoint_url,
        "CLIPSEARCH_SQS_ENDPOINT_URL": aws_endpoint_url,
        "CLIPSEARCH_QUEUE_URL": ingest_stack.queue_url,
        "CLIPSEARCH_MODEL_CACHE_DIR": str(tmp_path / "model-cache"),
        "AWS_REGION": "us-east-1",
    }


def index_photos(stack, photos: list[Path], prefix: str = "") -> None:
    """Uploads and indexes `photos` in-process (one batch, one segment)."""
    for photo in photos:
        stack.upload(f"datasets/{DATASET}/{prefix}{photo.name}", photo.read_bytes())
    response = preprocess_function().handle(stack.drain(), CONTEXT, stack.service())
    assert response == {"batchItemFailures": []}


def http(fixture: str, request_id: str, **fields) -> dict:
    event = http_event(fixture, dataset=DATASET, **fields)
    event["requestContext"]["requestId"] = request_id
    return event


def assert_each_line_names_its_request(run: Run, correlation_ids: list[str | None], function: str) -> None:
    request_ids = [f"request-{number}" for number in range(len(correlation_ids))]
    assert run.logs, "no log line at all"
    for line in run.logs:
        assert line["function_name"] == f"clipsearch-{function}" and line["service"] == f"clipsearch-{function}"
        assert line["function_request_id"] in request_ids, line
        expected = correlation_ids[request_ids.index(line["function_request_id"])]
        assert line.get("correlation_id") == expected, line
    assert run.metric_values("ColdStart") == [1], run.metrics  # once per execution environment
    [cold_start] = [d for d in run.metrics if "ColdStart" in d]
    assert cold_start["function_name"] == f"clipsearch-{function}"
    assert run.tracing_enabled and "Traceback" not in run.stderr


def test_search_logs_its_ids_and_measures_latency_and_cache_hits(ingest_stack, environment, seed_eval_photos,
                                                                  tmp_path) -> None:
    index_photos(ingest_stack, seed_eval_photos[:5])
    query = seed_eval_photos[0].read_bytes()
    events = [
        http("search_text", "api-text-1", body={"query": "a dog on a beach", "k": 3}),
        http("search_text", "api-text-2", body={"query": "a lion", "k": 3}),
        http("search_image_raw", "api-image", body=query, query={"k": "2"}),
        http("search_text", "api-blank", body={"query": "   "}),  # refused by the service: 400, no metrics
    ]

    run = run_function("search", events, environment, tmp_path)

    assert [answer["statusCode"] for answer in run.answers] == [200, 200, 200, 400]
    assert_each_line_names_its_request(run, ["api-text-1", "api-text-2", "api-image", "api-blank"], "search")
    [refresh] = [line for line in run.logs_of("clipsearch.search") if "index_version" in line["message"]]
    assert refresh["level"] == "INFO" and f"dataset {DATASET}" in refresh["message"]
    assert refresh["function_request_id"] == "request-0" and refresh["correlation_id"] == "api-text-1"
    [refused] = run.logs_of("clipsearch.http.errors")
    assert refused["function_request_id"] == "request-3" and refused["message"].startswith("400 invalid_request")

    first, second, image = (run.metrics_of(f"request-{number}") for number in range(3))
    assert set(first) == {"TextQueryLatency", "ModelCacheHit", "SegmentCacheHit"}
    # The text tower starts loading during init, so whether the first request found it ready is a race
    # (with the tiny test model it usually wins); the segments only load once a request names the dataset.
    assert first["SegmentCacheHit"] == 0
    assert (second["ModelCacheHit"], second["SegmentCacheHit"]) == (1, 1)  # warm
    assert set(image) == {"ImageQueryLatency", "ModelCacheHit", "SegmentCacheHit"}
    assert (image["ModelCacheHit"], image["SegmentCacheHit"]) == (0, 1)  # the vision tower is its own load
    assert first["TextQueryLatency"] > 0 and image["ImageQueryLatency"] > 0
    assert first["TextQueryLatency"] == json.loads(run.answers[0]["body"])["took_ms"]
    document = next(d for d in run.metrics if d.get("function_request_id") == "request-0")
    assert document["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "clipsearch"
    assert document["service"] == "search" and document["correlation_id"] == "api-text-1"
    units = {m["Name"]: m["Unit"] for m in document["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert units == {"TextQueryLatency": "Milliseconds", "ModelCacheHit": "Count", "SegmentCacheHit": "Count"}


def test_preprocess_logs_the_batch_with_its_request_id_and_counts_images(ingest_stack, environment,
                                                                        seed_eval_photos, tmp_path) -> None:
    for photo in seed_eval_photos[:3]:
        ingest_stack.upload(f"datasets/{DATASET}/{photo.name}", photo.read_bytes())
    ingest_stack.upload(f"datasets/{DATASET}/broken.jpg", b"not a jpeg")

    run = run_function("preprocess", [ingest_stack.drain()], environment, tmp_path)

    assert run.answers == [{"batchItemFailures": []}]
    assert_each_line_names_its_request(run, [None], "preprocess")
    committed = [line for line in run.logs_of("clipsearch.ingest") if "indexed" in line["message"]]
    assert [line["level"] for line in committed] == ["INFO"]
    assert "3 indexed, 1 failed" in committed[0]["message"]
    metrics = run.metrics_of("request-0")
    assert (metrics["ImagesIndexed"], metrics["ImagesFailed"], metrics["MessagesRetried"]) == (3, 1, 0)
    assert metrics["BatchLatency"] > 0 and metrics["SegmentBytes"] > 0


def test_datasets_logs_a_deletion_with_its_ids(ingest_stack, environment, seed_eval_photos, tmp_path) -> None:
    index_photos(ingest_stack, seed_eval_photos[:2])
    events = [http("list_datasets", "api-list"), http("delete_dataset", "api-delete")]
    deletions = ingest_stack.sqs.create_queue(QueueName=f"deletions-{ingest_stack.bucket}")["QueueUrl"]

    run = run_function("datasets", events, {**environment, "CLIPSEARCH_DELETION_QUEUE_URL": deletions}, tmp_path)

    assert [answer["statusCode"] for answer in run.answers] == [200, 202]
    assert_each_line_names_its_request(run, ["api-list", "api-delete"], "datasets")
    [queued] = run.logs_of("clipsearch.dataset_service")
    assert queued["level"] == "INFO" and queued["message"].startswith(f"deletion of dataset {DATASET} (#")
    assert (queued["function_request_id"], queued["correlation_id"]) == ("request-1", "api-delete")


def test_maintenance_functions_log_their_work_with_the_schedule_id(ingest_stack, environment, seed_eval_photos,
                                                                   tmp_path) -> None:
    index_photos(ingest_stack, seed_eval_photos[:2])
    index_photos(ingest_stack, seed_eval_photos[2:4], prefix="more-")
    scheduled = json.loads((EVENTS / "scheduled.json").read_text())

    compact = run_function("compact", [{"dataset": DATASET, "force": True}], environment, tmp_path)
    reconcile = run_function("reconcile", [scheduled], environment, tmp_path)

    assert_each_line_names_its_request(compact, [None], "compact")  # invoked directly: no correlation id
    [merged] = [line for line in compact.logs_of("clipsearch.compaction") if "merged" in line["message"]]
    assert merged["level"] == "INFO" and "merged 2 segments" in merged["message"]
    assert compact.metrics_of("request-0")["SegmentsMerged"] == 2

    assert_each_line_names_its_request(reconcile, [scheduled["id"]], "reconcile")
    [listed] = reconcile.logs_of("clipsearch.reconcile")
    assert listed["level"] == "INFO" and f"{DATASET!r}: 4 images listed, 0 enqueued" in listed["message"]
    assert reconcile.metrics_of("request-0")["ImagesEnqueued"] == 0
