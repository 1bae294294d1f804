"""`sam build` and `sam local invoke` of every function, in containers, against the test PostgreSQL and S3/SQS.

Runs when scripts/sam_local/setup.sh has prepared Docker and the Lambda base image and its variables are
sourced (CLIPSEARCH_SAM_LOCAL_READY=1, DOCKER_HOST). Skips otherwise, except in CI (CI=true), where a
missing setup is a failure: .ci/run runs the setup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from clipsearch.adapters.postgres_catalog import migrate
from clipsearch.adapters.postgres_connection import Database
from clipsearch.datasets import model_prefix
from clipsearch.model_files import ModelFiles

pytestmark = pytest.mark.sam_local

REPO = Path(__file__).resolve().parents[2]
EVENTS = REPO / "events"
SAM = REPO / "scripts" / "sam_local" / "sam"
DATASET = "demo"  # the dataset the files in events/ name
EVENTS_BUCKET = "clipsearch-123456789012-us-east-1-0a1b2c3d"  # the bucket the SQS events in events/ name
INDEXED_PHOTOS = ["beach_1", "beach_2", "beach_3", "beach_4", "birds_1", "birds_2", "birds_3", "birds_4"]
UNANNOUNCED_PHOTO = "city_1"  # uploaded while its event is lost: reconciliation must find it
INVOKE_TIMEOUT_SECONDS = 300


def sam_local_unavailable() -> str | None:
    """Why `sam local` cannot run here, or None when the setup's image answers."""
    if os.environ.get("CLIPSEARCH_SAM_LOCAL_READY") != "1" or not os.environ.get("DOCKER_HOST"):
        return "sam local is not set up: run scripts/sam_local/setup.sh, then `source .cache/sam_local/env`"
    if not (REPO / ".venv-sam" / "bin" / "sam").exists():
        return "the SAM CLI is not installed in .venv-sam (scripts/bootstrap.sh installs it)"
    image = os.environ.get("CLIPSEARCH_SAM_LOCAL_IMAGE", "")
    docker = shutil.which("docker")
    probe = subprocess.run([docker, "image", "inspect", image], capture_output=True, text=True) if docker else None
    if probe is None or probe.returncode != 0:
        return f"Docker does not answer at {os.environ['DOCKER_HOST']} or lacks the image {image!r}"
    return None


# Session-scoped and autouse, so it runs before the session fixtures this test uses (the model export...).
@pytest.fixture(scope="session", autouse=True)
def sam_local_ready() -> None:
    reason = sam_local_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run sam local: {reason}")
    pytest.skip(reason)


def run_sam(*arguments: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(SAM), *arguments], cwd=cwd, capture_output=True, text=True, timeout=INVOKE_TIMEOUT_SECONDS,
        env={**os.environ, "SAM_CLI_TELEMETRY": "0", **(env or {})},
    )
    assert result.returncode == 0, f"sam {' '.join(arguments)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def local_template(sam_local_ready, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sam build` of the repository's template, plus the local copy that declares the local endpoints."""
    build_dir = tmp_path_factory.mktemp("sam-build")
    # infra/Makefile compiles the bytecode with a python3.13; on a machine without one it would refuse to build.
    lambda_python = subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "infra" / "Makefile"),
                                    "print-lambda-python"], capture_output=True, text=True).stdout.strip()
    run_sam("build", "--build-dir", str(build_dir), env={} if lambda_python else {"BYTECODE": "none"})
    written = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sam_local" / "local_template.py"), str(build_dir / "template.yaml")],
        check=True, capture_output=True, text=True,
    )
    return Path(written.stdout.strip())


class SamLocal:
    """Invokes the built functions with `sam local invoke`, each with the same local environment."""

    def __init__(self, template: Path, env_vars: Path, log_dir: Path) -> None:
        self.template = template
        self.env_vars = env_vars
        self.log_dir = log_dir
        self.invocations = 0

    def invoke(self, function: str, event: Path) -> dict:
        result = run_sam(
            "local", "invoke", function, "--template", str(self.template), "--event", str(event),
            "--env-vars", str(self.env_vars), "--skip-pull-image",
        )
        self.invocations += 1
        (self.log_dir / f"{self.invocations}-{function}.log").write_text(result.stderr)
        assert "REPORT RequestId" in result.stderr, f"{function} did not run in the emulator:\n{result.stderr[-3000:]}"
        return json.loads(result.stdout.strip().splitlines()[-1])


def http_answer(response: dict) -> tuple[int, dict]:
    return response["statusCode"], json.loads(response["body"])


def lambda_sqs_event(sqs_client, queue_url: str, queue_arn: str) -> dict:
    """The queue's messages (the bucket's own notifications) as the SQS event Lambda would deliver."""
    records = []
    while messages := sqs_client.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, AttributeNames=["All"]
    ).get("Messages", []):
        for message in messages:
            records.append({
                "messageId": message["MessageId"], "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"], "attributes": message.get("Attributes", {}), "messageAttributes": {},
                "md5OfBody": message["MD5OfBody"], "eventSource": "aws:sqs", "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            })
            sqs_client.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return {"Records": records}


@pytest.fixture
def events_bucket(s3_client) -> str:
    """The bucket the example events name (ingest ignores events of other buckets), emptied first."""
    s3_client.create_bucket(Bucket=EVENTS_BUCKET)
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=EVENTS_BUCKET):
        for item in page.get("Contents", []):
            s3_client.delete_object(Bucket=EVENTS_BUCKET, Key=item["Key"])
    return EVENTS_BUCKET


def image_rows(database_url: str) -> list[tuple[str, str]]:
    """(key, status) of every catalog row of the dataset: a doubled image would show twice."""
    with psycopg.connect(database_url) as connection:
        return connection.execute(
            "SELECT i.object_key, i.status FROM images i JOIN datasets d ON d.id = i.dataset_id"
            " WHERE d.name = %s ORDER BY i.object_key",
            (DATASET,),
        ).fetchall()


def test_sam_local_invoke_runs_every_function(
    local_template: Path, database_url: str, aws_endpoint_url: str, s3_client, sqs_client, events_bucket: str,
    tiny_model_dir: Path, seed_eval_dir: Path, tmp_path: Path,
):
    bucket = events_bucket
    database = Database(database_url)
    migrate(database)
    database.close()
    model_id = ModelFiles.open(tiny_model_dir).model_id
    for path in sorted(tiny_model_dir.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            s3_client.upload_file(str(path), bucket, model_prefix(model_id) + path.relative_to(tiny_model_dir).as_posix())
    queue_url = sqs_client.create_queue(QueueName=f"{bucket}-ingest")["QueueUrl"]
    queue_arn = sqs_client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3_client.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [
        {"QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
         "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "datasets/"}]}}}]})  # as the template
    lambda_sqs_event(sqs_client, queue_url, queue_arn)  # the s3:TestEvent a new configuration may send

    def upload(name: str) -> str:
        key = f"datasets/{DATASET}/{name}.jpeg"
        s3_client.upload_file(str(seed_eval_dir / "train" / f"{name}.jpeg"), bucket, key,
                              ExtraArgs={"Metadata": {"source-path": f"photos/{name}.jpeg"}})
        return key

    keys = [upload(name) for name in INDEXED_PHOTOS]
    env_vars = tmp_path / "env.json"
    env_vars.write_text(json.dumps({"Parameters": {
        "CLIPSEARCH_BUCKET": bucket, "CLIPSEARCH_MODEL_ID": model_id, "CLIPSEARCH_DB_SECRET_ARN": "",
        "CLIPSEARCH_DATABASE_URL": database_url, "CLIPSEARCH_S3_ENDPOINT_URL": aws_endpoint_url,
        "CLIPSEARCH_SQS_ENDPOINT_URL": aws_endpoint_url, "CLIPSEARCH_QUEUE_URL": queue_url,
        "CLIPSEARCH_ONNX_THREADS": "1",
    }}))
    sam = SamLocal(local_template, env_vars, tmp_path)

    # Preprocess: the example event (one image), then the batch the bucket's notifications filled.
    assert sam.invoke("PreprocessFunction", EVENTS / "sqs-s3-put.json") == {"batchItemFailures": []}
    assert image_rows(database_url) == [("datasets/demo/beach_1.jpeg", "indexed")]
    batch = tmp_path / "sqs-batch.json"
    batch.write_text(json.dumps(lambda_sqs_event(sqs_client, queue_url, queue_arn)))
    assert len(json.loads(batch.read_text())["Records"]) == len(keys)
    assert sam.invoke("PreprocessFunction", batch) == {"batchItemFailures": []}
    assert image_rows(database_url) == sorted((key, "indexed") for key in keys)

    # Search: by text, then by the key of a stored image (which must find itself first).
    status, answer = http_answer(sam.invoke("SearchFunction", EVENTS / "http-search-text.json"))
    assert status == 200, answer
    assert answer["dataset"] == DATASET and answer["model"] == model_id
    assert [hit["rank"] for hit in answer["results"]] == [1, 2, 3, 4, 5]
    scores = [hit["score"] for hit in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    assert {hit["key"] for hit in answer["results"]} <= set(keys)
    assert all(hit["path"] == f"photos/{hit['key'].rsplit('/', 1)[1]}" for hit in answer["results"])
    status, answer = http_answer(sam.invoke("SearchFunction", EVENTS / "http-search-image-key.json"))
    assert status == 200, answer
    assert answer["results"][0]["key"] == "datasets/demo/beach_1.jpeg"
    assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    # Datasets: the list names the dataset with its indexed count and model.
    status, answer = http_answer(sam.invoke("DatasetsFunction", EVENTS / "http-list-datasets.json"))
    assert status == 200, answer
    (listed,) = [entry for entry in answer["datasets"] if entry["name"] == DATASET]
    assert listed["model"] == model_id
    assert listed["counts"]["indexed"] == len(keys), listed

    # Compact: the two segments the two batches wrote become one.
    report = sam.invoke("CompactFunction", EVENTS / "compact-demo.json")
    (compacted,) = report["datasets"]
    assert compacted["dataset"] == DATASET and compacted["merged_segments"] == 2, report
    assert compacted["vectors_kept"] == len(keys), report

    # Preprocess a removal: the example delete event for an image gone from the bucket.
    s3_client.delete_object(Bucket=bucket, Key="datasets/demo/beach_1.jpeg")
    lambda_sqs_event(sqs_client, queue_url, queue_arn)  # its own notification: the example event stands in
    assert sam.invoke("PreprocessFunction", EVENTS / "sqs-s3-delete.json") == {"batchItemFailures": []}
    assert dict(image_rows(database_url))["datasets/demo/beach_1.jpeg"] == "deleted"

    # Reconcile (scheduled): an image whose event was lost is found and queued again.
    lost_key = upload(UNANNOUNCED_PHOTO)
    lambda_sqs_event(sqs_client, queue_url, queue_arn)  # the lost event
    report = sam.invoke("ReconcileFunction", EVENTS / "scheduled.json")
    (reconciled,) = report["datasets"]
    assert reconciled["dataset"] == DATASET and reconciled["enqueued"] == 1, report
    requeued = lambda_sqs_event(sqs_client, queue_url, queue_arn)["Records"]
    announced = [record["s3"]["object"]["key"] for message in requeued
                 for record in json.loads(message["body"])["Records"]]
    assert announced == [lost_key]
