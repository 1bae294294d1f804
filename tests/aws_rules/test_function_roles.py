"""Every function's real code paths under exactly its translated role's policies, IAM enforced; and what each
role must not be able to do."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from botocore.exceptions import ClientError
from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
from clipsearch.adapters.postgres_connection import RDS_CA_BUNDLE, Database, conninfo_from_secret
from clipsearch.errors import TransientError
from clipsearch.events import parse_message
from psycopg.conninfo import conninfo_to_dict
from aws_world import AwsWorld, CallLog, jpeg
from http_events import LambdaContext, http_event, invoke, load_function
from template_roles import MANAGED_POLICIES

pytestmark = pytest.mark.aws_rules

FUNCTIONS = {"PreprocessFunction", "SearchFunction", "DatasetsFunction", "CompactFunction", "ReconcileFunction",
             "ShardSearchFunction", "DatasetDeletionFunction"}
CONTEXT = LambdaContext(function_name="clipsearch-aws-rules")


def assert_all_allowed(log: CallLog, *expected: tuple[str, str]) -> None:
    """No call was refused, and each expected (operation, target prefix) was really made."""
    assert log.denied() == [], log.denied()
    for operation, prefix in expected:
        assert log.made(operation, prefix), f"no {operation} on {prefix!r} in {log.calls}"


def migrated(world: AwsWorld) -> None:
    database = Database(world.database_url)
    try:
        migrate(database)
    finally:
        database.close()


def ingest(world: AwsWorld, dataset: str, images: dict[str, bytes]) -> CallLog:
    """Uploads, then the preprocessing function consumes the bucket's notifications as Lambda would."""
    for name, data in images.items():
        world.upload(f"datasets/{dataset}/{name}", data)
    event = world.drain()
    with world.run_as("PreprocessFunction") as log:
        assert load_function("preprocess").handler(event, CONTEXT) == {"batchItemFailures": []}
    assert_all_allowed(log)
    return log


def rows(world: AwsWorld, dataset: str) -> dict[str, str]:
    with psycopg.connect(world.database_url) as connection:
        return dict(connection.execute(
            "SELECT i.object_key, i.status FROM images i JOIN datasets d ON d.id = i.dataset_id WHERE d.name = %s",
            (dataset,)).fetchall())


def test_the_template_has_a_role_per_function_and_no_broad_managed_policy(world: AwsWorld) -> None:
    assert set(world.roles) == FUNCTIONS
    for role in world.roles.values():
        assert set(role.managed_policy_arns) <= set(MANAGED_POLICIES.values()), role
        assert role.policy_documents, role
        assert role.environment["CLIPSEARCH_DB_SECRET_ARN"] == world.resources.secret_arn


def test_migrate_reads_the_rds_secret_from_secrets_manager(world: AwsWorld, capsys) -> None:
    from clipsearch_tools.cli import main

    with world.run_as("operator", CLIPSEARCH_DB_SECRET_ARN=world.resources.secret_arn) as log:
        assert main(["migrate", "--json"]) == 0
    applied = json.loads(capsys.readouterr().out)["applied"]
    assert applied and all(name.endswith(".sql") for name in applied)
    assert_all_allowed(log, ("GetSecretValue", world.resources.secret_arn))
    with psycopg.connect(world.database_url) as connection:
        assert connection.execute("SELECT count(*) FROM datasets").fetchone() == (0,)


def test_preprocess_indexes_records_failures_removals_and_discards_an_abandoned_segment(world: AwsWorld) -> None:
    migrated(world)
    world.upload("datasets/pets/a.jpg", jpeg(1))
    world.upload("datasets/pets/b.jpg", jpeg(2))
    world.upload("datasets/pets/broken.jpg", b"not an image at all")
    preprocess = load_function("preprocess")
    with world.run_as("PreprocessFunction") as log:
        assert preprocess.handler(world.drain(), CONTEXT) == {"batchItemFailures": []}
        world.client("s3").delete_object(Bucket=world.resources.bucket, Key="datasets/pets/b.jpg")
        assert preprocess.handler(world.drain(), CONTEXT) == {"batchItemFailures": []}
    assert rows(world, "pets") == {"datasets/pets/a.jpg": "indexed", "datasets/pets/b.jpg": "deleted",
                                   "datasets/pets/broken.jpg": "failed"}
    assert_all_allowed(log, ("GetObject", "models/"), ("GetObject", "datasets/pets/"),
                       ("PutObject", "indexes/pets/segments/"), ("HeadObject", "datasets/pets/b.jpg"))

    # A dataset deleted while its batch ran: the batch's segment object is discarded by this function.
    world.upload("datasets/doomed/c.jpg", jpeg(3))
    events = [event for record in world.drain()["Records"] for event in parse_message(record["messageId"], record["body"])]
    with world.run_as("PreprocessFunction") as log:
        from clipsearch import wiring

        catalog = DeletedBeforeCommit(wiring.get_database())
        service = wiring.get_ingest_service()
        service._catalog = catalog  # the wired service, with a catalog that loses the dataset before commit
        report = service.ingest(events)
    assert catalog.deleted and report.retry == {}
    assert world.keys_under("indexes/doomed/") == []
    assert_all_allowed(log, ("PutObject", "indexes/doomed/"), ("DeleteObjects", "indexes/doomed/"))


def test_preprocess_hands_messages_failed_by_a_database_outage_back_sooner(world: AwsWorld) -> None:
    migrated(world)
    world.upload("datasets/pets/a.jpg", jpeg(4))
    sqs = world.client("sqs")
    messages = sqs.receive_message(QueueUrl=world.resources.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=5,
                                   MessageSystemAttributeNames=["All"])["Messages"]
    event = {"Records": [{
        "messageId": message["MessageId"], "receiptHandle": message["ReceiptHandle"], "body": message["Body"],
        "attributes": message["Attributes"], "messageAttributes": {}, "md5OfBody": message["MD5OfBody"],
        "eventSource": "aws:sqs", "eventSourceARN": world.resources.queue_arn, "awsRegion": "us-east-1",
    } for message in messages]}  # left on the queue: Lambda deletes only what the function did not fail
    with world.run_as("PreprocessFunction") as log:
        from clipsearch import wiring

        service = wiring.get_ingest_service()
        service._catalog = DatabaseDown(wiring.get_database())  # the wired service while PostgreSQL is down
        response = load_function("preprocess").handler(event, CONTEXT)
    assert [item["itemIdentifier"] for item in response["batchItemFailures"]] == [messages[0]["MessageId"]]
    assert_all_allowed(log, ("ChangeMessageVisibilityBatch", world.resources.queue_url))


class DatabaseDown(PostgresCatalog):
    def claim_images(self, *args, **kwargs):
        raise TransientError("injected: connection to the database refused")


class DeletedBeforeCommit(PostgresCatalog):
    """A user deletes the dataset between the batch's segment write and its commit."""

    deleted = False

    def commit_batch(self, dataset_id, *args, **kwargs):
        if not self.deleted:
            self.deleted = True
            (name,) = [s.dataset.name for s in self.list_datasets() if s.dataset.id == dataset_id]
            self.remove_dataset(name)
        return super().commit_batch(dataset_id, *args, **kwargs)


def test_search_by_text_image_and_key(world: AwsWorld) -> None:
    migrated(world)
    ingest(world, "pets", {f"p{i}.jpg": jpeg(10 + i) for i in range(4)})
    with world.run_as("SearchFunction") as log:
        search = load_function("search")  # its init fetches the text model, under its own role as in Lambda
        text_status, text = invoke(search, http_event("search_text", dataset="pets", body={"query": "a cat", "k": 3}))
        image_status, image = invoke(search, http_event("search_image_raw", dataset="pets", body=jpeg(11)))
        key_status, by_key = invoke(search, http_event("search_image_json", dataset="pets",
                                                       body={"key": "datasets/pets/p2.jpg", "k": 1}))
    assert (text_status, image_status, key_status) == (200, 200, 200), (text, image, by_key)
    assert len(text["results"]) == 3
    assert image["results"][0]["key"] == "datasets/pets/p1.jpg"
    assert by_key["results"][0]["key"] == "datasets/pets/p2.jpg"
    assert_all_allowed(log, ("GetObject", "models/"), ("GetObject", "indexes/pets/segments/"),
                       ("HeadObject", "datasets/pets/p2.jpg"), ("GetObject", "datasets/pets/p2.jpg"))


def delete_dataset(world: AwsWorld, dataset: str) -> tuple[CallLog, CallLog]:
    """The datasets function accepts the deletion (202); the deletion worker, fed its queue as Lambda would,
    does it; then its scheduled sweep runs (nothing left to resume). Returns both functions' call logs."""
    with world.run_as("DatasetsFunction") as accepted_log:
        status, accepted = invoke(load_function("datasets"), http_event("delete_dataset", dataset=dataset))
    assert (status, accepted["status"]) == (202, "deleting"), accepted
    sqs, queue_url, records = world.client("sqs"), world.resources.deletion_queue_url, []
    while messages := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", []):
        for message in messages:
            records.append({"messageId": message["MessageId"], "receiptHandle": message["ReceiptHandle"],
                            "body": message["Body"], "eventSource": "aws:sqs"})
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    worker = load_function("dataset_deletion")
    with world.run_as("DatasetDeletionFunction") as worker_log:
        assert worker.handler({"Records": records}, WorkerContext()) == {
            "tasks": [{"dataset": dataset, "outcome": "finished"}]}
        assert worker.handler({"source": "aws.events", "detail-type": "Scheduled Event"}, WorkerContext()) == {
            "resumed": []}
    assert_all_allowed(accepted_log, ("SendMessageBatch", queue_url))
    return accepted_log, worker_log


@dataclass
class WorkerContext(LambdaContext):
    """The deletion worker's context: `remaining_ms` of its timeout left."""

    remaining_ms: int = 900_000

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def test_datasets_list_show_delete(world: AwsWorld) -> None:
    migrated(world)
    ingest(world, "pets", {"a.jpg": jpeg(20), "broken.jpg": b"no image"})
    ingest(world, "birds", {"b.jpg": jpeg(21)})
    datasets = load_function("datasets")
    with world.run_as("DatasetsFunction") as log:
        listed_status, listed = invoke(datasets, http_event("list_datasets"))
        shown_status, shown = invoke(datasets, http_event("get_dataset", dataset="pets"))
    assert (listed_status, shown_status) == (200, 200), (listed, shown)
    assert "pets" in json.dumps(listed) and "birds" in json.dumps(listed)
    assert "broken.jpg" in json.dumps(shown)
    assert_all_allowed(log)

    _, worker_log = delete_dataset(world, "pets")

    assert world.keys_under("datasets/pets/") == [] and world.keys_under("indexes/pets/") == []
    assert world.keys_under("thumbnails/pets/") == []
    assert world.keys_under("datasets/birds/") == ["datasets/birds/b.jpg"]
    assert world.keys_under("thumbnails/birds/") == ["thumbnails/birds/b.jpg.webp"]
    assert_all_allowed(worker_log, ("ListObjectsV2", "datasets/pets/"), ("ListObjectsV2", "indexes/pets/"),
                       ("ListObjectsV2", "thumbnails/pets/"), ("DeleteObjects", "datasets/pets/"),
                       ("DeleteObjects", "thumbnails/pets/"), ("DeleteObjects", "indexes/pets/"))


def test_the_deletion_worker_queues_what_it_has_no_time_for(world: AwsWorld) -> None:
    migrated(world)
    ingest(world, "pets", {"a.jpg": jpeg(22)})
    with world.run_as("DatasetsFunction"):
        assert invoke(load_function("datasets"), http_event("delete_dataset", dataset="pets"))[0] == 202
    queue_url = world.resources.deletion_queue_url
    [message] = world.client("sqs").receive_message(QueueUrl=queue_url).get("Messages", [])
    event = {"Records": [{"messageId": message["MessageId"], "receiptHandle": message["ReceiptHandle"],
                          "body": message["Body"], "eventSource": "aws:sqs"}]}
    with world.run_as("DatasetDeletionFunction") as log:
        answer = load_function("dataset_deletion").handler(event, WorkerContext(remaining_ms=1_000))
    assert answer == {"tasks": [{"dataset": "pets", "outcome": "unfinished"}]}
    assert_all_allowed(log, ("SendMessageBatch", queue_url))


def test_compaction_merges_and_removes_orphans(world: AwsWorld) -> None:
    migrated(world)
    for batch in range(3):
        ingest(world, "pets", {f"b{batch}.jpg": jpeg(30 + batch)})
    orphan = "indexes/pets/segments/orphan-from-a-crashed-batch.faiss"
    world.upload(orphan, b"an abandoned segment object")
    compact = load_function("compact")
    with world.run_as("CompactFunction", CLIPSEARCH_ORPHAN_GRACE_SECONDS="-5") as log:
        merged = compact.handler({"dataset": "pets", "force": True}, CONTEXT)["datasets"][0]
        swept = compact.handler({}, CONTEXT)["datasets"][0]
    assert (merged["merged_segments"], merged["vectors_kept"]) == (3, 3), merged
    assert merged["objects_removed"] + swept["objects_removed"] == 4, (merged, swept)  # 3 retired + the orphan
    assert len(world.keys_under("indexes/pets/segments/")) == 1 and orphan not in world.keys_under("indexes/")
    assert_all_allowed(log, ("GetObject", "indexes/pets/segments/"), ("PutObject", "indexes/pets/segments/"),
                       ("ListObjectsV2", "indexes/pets/segments/"), ("DeleteObjects", "indexes/pets/segments/"))


def test_reconciliation_enqueues_missed_images_and_marks_vanished_ones(world: AwsWorld) -> None:
    migrated(world)
    ingest(world, "pets", {"kept.jpg": jpeg(40), "vanished.jpg": jpeg(41)})
    world.upload("datasets/pets/missed.jpg", jpeg(42))
    world.client("s3").delete_object(Bucket=world.resources.bucket, Key="datasets/pets/vanished.jpg")
    world.drain()  # the events were lost: reconciliation is what finds both
    reconcile = load_function("reconcile")
    with world.run_as("ReconcileFunction") as log:
        (one,) = reconcile.handler({"dataset": "pets"}, CONTEXT)["datasets"]
        (every,) = reconcile.handler({}, CONTEXT)["datasets"]
    assert (one["enqueued"], one["marked_deleted"]) == (1, 1), one
    assert (every["enqueued"], every["marked_deleted"]) == (1, 0), every
    assert rows(world, "pets")["datasets/pets/vanished.jpg"] == "deleted"
    bodies = [record["body"] for record in world.drain()["Records"]]
    assert len(bodies) == 2 and all("missed.jpg" in body for body in bodies)
    assert_all_allowed(log, ("ListObjectsV2", "datasets/pets/"), ("ListObjectsV2", "datasets/"),
                       ("HeadObject", "datasets/pets/vanished.jpg"), ("SendMessageBatch", world.resources.queue_url))


# --- what each role must not do ------------------------------------------------------------------------------

def _s3(operation: str, key: str):
    def call(world: AwsWorld, who: str):
        s3, bucket = world.client("s3", who), world.resources.bucket
        if operation == "put":
            return s3.put_object(Bucket=bucket, Key=key, Body=b"x")
        if operation == "get":
            return s3.get_object(Bucket=bucket, Key=key)
        if operation == "delete":
            return s3.delete_object(Bucket=bucket, Key=key)
        if operation == "list":
            return s3.list_objects_v2(Bucket=bucket, Prefix=key)
        raise ValueError(operation)
    call.__name__ = f"{operation} {key}"
    return call


def _delete_many(key: str):
    def call(world: AwsWorld, who: str):
        response = world.client("s3", who).delete_objects(Bucket=world.resources.bucket,
                                                          Delete={"Objects": [{"Key": key}]})
        errors = response.get("Errors", [])
        if errors:
            raise ClientError({"Error": {"Code": errors[0]["Code"], "Message": errors[0]["Message"]}}, "DeleteObjects")
        return response
    call.__name__ = f"delete_objects {key}"
    return call


def _send_message(world: AwsWorld, who: str):
    return world.client("sqs", who).send_message(QueueUrl=world.resources.queue_url, MessageBody="{}")


def _other_secret(world: AwsWorld, who: str):
    return world.client("secretsmanager", who).get_secret_value(SecretId=world.other_secret_arn)


MODEL_FILE = "models/random-tiny-seed0/manifest.json"
IMAGE = "datasets/pets/a.jpg"
SEGMENT = "indexes/pets/segments/s.faiss"
NO_BUSINESS = {
    "PreprocessFunction": [_s3("put", "models/x/manifest.json"), _s3("put", "datasets/pets/new.jpg"),
                           _s3("delete", IMAGE), _delete_many(IMAGE), _delete_many(MODEL_FILE),
                           _s3("get", SEGMENT), _send_message],
    "SearchFunction": [_s3("put", "models/x/manifest.json"), _s3("put", SEGMENT), _s3("put", IMAGE),
                       _s3("delete", IMAGE), _s3("delete", SEGMENT), _delete_many(SEGMENT), _send_message],
    "DatasetsFunction": [_s3("get", MODEL_FILE), _s3("get", IMAGE), _s3("get", SEGMENT),
                         _s3("put", "models/x/manifest.json"), _s3("put", IMAGE), _s3("delete", MODEL_FILE),
                         _s3("list", "models/"), _s3("list", ""), _send_message,
                         _s3("delete", IMAGE), _delete_many(IMAGE), _s3("delete", SEGMENT)],
    "DatasetDeletionFunction": [_s3("get", IMAGE), _s3("get", SEGMENT), _s3("get", MODEL_FILE), _s3("put", IMAGE),
                                _s3("put", SEGMENT), _s3("delete", MODEL_FILE), _delete_many(MODEL_FILE),
                                _s3("list", "models/"), _s3("list", ""), _send_message],
    "CompactFunction": [_s3("get", IMAGE), _s3("get", MODEL_FILE), _s3("delete", IMAGE), _s3("put", IMAGE),
                        _s3("put", "models/x/manifest.json"), _s3("list", "datasets/"), _send_message],
    "ReconcileFunction": [_s3("delete", IMAGE), _delete_many(IMAGE), _s3("put", IMAGE), _s3("get", MODEL_FILE),
                          _s3("get", SEGMENT), _s3("put", "models/x/manifest.json"), _s3("delete", SEGMENT)],
    "operator": [_s3("get", IMAGE), _s3("list", ""), _send_message],
}


@pytest.mark.parametrize("who", sorted(NO_BUSINESS))
def test_each_role_is_refused_what_its_function_has_no_business_doing(world: AwsWorld, who: str) -> None:
    for key in (MODEL_FILE, IMAGE, SEGMENT):
        if key != MODEL_FILE:
            world.upload(key, b"present, so a refusal is about permission, not existence")
    world.other_secret_arn = world.client("secretsmanager").create_secret(
        Name=f"someone-else/{who}", SecretString="{}")["ARN"]
    refused = []
    for probe in NO_BUSINESS[who] + [_other_secret]:
        with pytest.raises(ClientError) as raised:
            probe(world, who)
        response = raised.value.response
        refused.append((probe.__name__, response["Error"]["Code"],
                        response.get("ResponseMetadata", {}).get("HTTPStatusCode", 403)))
    # moto's SQS and Secrets Manager refusals come as bare 403s that botocore cannot parse a code from
    assert all(code.startswith("AccessDenied") or (code, status) == ("403", 403) for _, code, status in refused), refused
    assert len(refused) == len(NO_BUSINESS[who]) + 1
    # the objects the probes tried to remove are all still there
    for key in (MODEL_FILE, IMAGE, SEGMENT):
        world.client("s3").head_object(Bucket=world.resources.bucket, Key=key)


def test_a_missing_key_is_404_only_to_a_role_allowed_to_list_the_bucket(world: AwsWorld) -> None:
    """The S3 rule the reconcile fix rests on, as the enforcing endpoint models it."""
    missing = "indexes/pets/segments/never-written.faiss"
    with pytest.raises(ClientError) as compact:  # GetObject on indexes/*, ListBucket only for prefixes
        world.client("s3", "CompactFunction").head_object(Bucket=world.resources.bucket, Key=missing)
    with pytest.raises(ClientError) as search:  # GetObject on indexes/*, ListBucket on the bucket
        world.client("s3", "SearchFunction").head_object(Bucket=world.resources.bucket, Key=missing)
    assert (compact.value.response["Error"]["Code"], search.value.response["Error"]["Code"]) == ("403", "404")


# --- hardening: presigned URLs, versioned deletions, TLS to the database --------------------------------------

def test_search_presigns_result_urls_with_sigv4_for_an_hour_at_most(world: AwsWorld) -> None:
    migrated(world)
    image = jpeg(50)
    ingest(world, "pets", {"p.jpg": image})
    with world.run_as("SearchFunction") as log:
        search = load_function("search")
        status, answer = invoke(search, http_event("search_text", dataset="pets", body={"query": "a cat", "k": 1},
                                                   query={"presign": "true"}))
    assert status == 200, answer
    url = answer["results"][0]["url"]
    signature = parse_qs(urlsplit(url).query)
    assert signature["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"], url
    assert 0 < int(signature["X-Amz-Expires"][0]) <= 3600, url
    assert signature["X-Amz-Credential"][0].startswith(world.keys["SearchFunction"][0] + "/"), url
    with urllib.request.urlopen(url, timeout=10) as response:  # signed by the search role, opened by anyone
        assert response.read() == image
    with pytest.raises(urllib.error.HTTPError) as tampered:  # the signature covers the key
        urllib.request.urlopen(url.replace("/datasets/pets/p.jpg?", "/datasets/pets/other.jpg?"), timeout=10)
    assert tampered.value.code == 403
    assert_all_allowed(log, ("GetObject", "indexes/pets/segments/"))


def test_a_deleted_dataset_stays_recoverable_and_no_function_can_purge_its_versions(world: AwsWorld) -> None:
    """The template versions the bucket: a deletion leaves delete markers an operator can remove for a while."""
    s3, bucket = world.client("s3"), world.resources.bucket
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    migrated(world)
    ingest(world, "pets", {"a.jpg": jpeg(60), "gone.jpg": jpeg(61)})
    marker_version = s3.delete_object(Bucket=bucket, Key="datasets/pets/gone.jpg")["VersionId"]
    # AWS's event for a delete in a versioned bucket; moto sends none for a delete marker
    body = json.dumps({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-11-29T06:00:00.000Z", "eventName": "ObjectRemoved:DeleteMarkerCreated",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": "datasets/pets/gone.jpg", "versionId": marker_version,
                          "sequencer": "0065F0C1A2B3C4D5E6"}}}]})
    event = {"Records": [{
        "messageId": "delete-marker-1", "receiptHandle": "delete-marker-1", "body": body,
        "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
        "md5OfBody": hashlib.md5(body.encode()).hexdigest(), "eventSource": "aws:sqs",
        "eventSourceARN": world.resources.queue_arn, "awsRegion": "us-east-1"}]}
    assert world.drain()["Records"] == []
    with world.run_as("PreprocessFunction") as log:
        assert load_function("preprocess").handler(event, CONTEXT) == {"batchItemFailures": []}
    assert_all_allowed(log, ("HeadObject", "datasets/pets/gone.jpg"))
    assert rows(world, "pets") == {"datasets/pets/a.jpg": "indexed", "datasets/pets/gone.jpg": "deleted"}

    _, worker_log = delete_dataset(world, "pets")
    assert_all_allowed(worker_log, ("DeleteObjects", "datasets/pets/"))
    assert world.keys_under("datasets/pets/") == []
    history = s3.list_object_versions(Bucket=bucket, Prefix="datasets/pets/")
    version = next(v for v in history["Versions"] if v["Key"] == "datasets/pets/a.jpg")
    marker = next(m for m in history["DeleteMarkers"] if m["Key"] == "datasets/pets/a.jpg")
    assert {v["Key"] for v in history["Versions"]} == {m["Key"] for m in history["DeleteMarkers"]} == {
        "datasets/pets/a.jpg", "datasets/pets/gone.jpg"}

    for who in sorted(FUNCTIONS):
        with pytest.raises(ClientError) as refused:
            world.client("s3", who).delete_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
        assert refused.value.response["Error"]["Code"].startswith("AccessDenied"), who

    s3.delete_object(Bucket=bucket, Key=marker["Key"], VersionId=marker["VersionId"])  # the operator's undo
    assert s3.get_object(Bucket=bucket, Key="datasets/pets/a.jpg")["Body"].read() == jpeg(60)


def test_an_rds_secret_without_sslmode_connects_only_to_a_server_whose_certificate_verifies(world: AwsWorld) -> None:
    server = conninfo_to_dict(world.database_url)
    secret = {"engine": "postgres", "host": server.get("host", "127.0.0.1"), "port": int(server.get("port", 5432)),
              "username": server.get("user", "postgres"), "password": server.get("password", ""),
              "dbname": server["dbname"]}
    conninfo = conninfo_to_dict(conninfo_from_secret(json.dumps(secret)))
    assert (conninfo["sslmode"], conninfo["sslrootcert"]) == ("verify-full", RDS_CA_BUNDLE)
    # The real libpq refuses the plain-text test server instead of falling back to an unencrypted session.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(conninfo_from_secret(json.dumps(secret)), connect_timeout=5).close()

    proxy = conninfo_to_dict(conninfo_from_secret(json.dumps({**secret, "sslrootcert": "system"})))
    assert (proxy["sslmode"], proxy["sslrootcert"]) == ("verify-full", "system")
    local = conninfo_to_dict(conninfo_from_secret(json.dumps({**secret, "sslmode": "disable"})))
    assert local["sslmode"] == "disable" and "sslrootcert" not in local
    with psycopg.connect(conninfo_from_secret(json.dumps({**secret, "sslmode": "disable"}))) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
