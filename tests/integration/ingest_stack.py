"""The ingestion test stack: a migrated catalog, a bucket that notifies a real SQS queue, the tiny model."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
from clipsearch.adapters.postgres_connection import Database
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.adapters.s3_store import S3ObjectStore
from clipsearch.encoders import OnnxImageEncoder
from clipsearch.ingest import IngestService
from clipsearch.model_files import ModelFiles
from http_events import LambdaContext, load_function


@dataclass
class IngestStack:
    database_url: str
    database: Database
    catalog: PostgresCatalog
    store: S3ObjectStore
    encoder: OnnxImageEncoder
    model_id: str
    s3: object
    sqs: object
    bucket: str
    queue_url: str
    queue_arn: str

    def service(self, catalog: PostgresCatalog | None = None, **options) -> IngestService:
        return IngestService(self.store, catalog or self.catalog, self.encoder, self.model_id, FaissVectorIndex(), **options)

    def upload(self, key: str, data: bytes, source_path: str | None = None) -> str:
        metadata = {"source-path": source_path} if source_path else {}
        return self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata=metadata)["ETag"].strip('"')

    def drain(self) -> dict:
        """The queue's messages as one Lambda SQS event (deleted from the queue, as Lambda would on success)."""
        records = []
        while True:
            response = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, AttributeNames=["All"]
            )
            messages = response.get("Messages", [])
            if not messages:
                break
            for message in messages:
                records.append({
                    "messageId": message["MessageId"],
                    "receiptHandle": message["ReceiptHandle"],
                    "body": message["Body"],
                    "attributes": message.get("Attributes", {}),
                    "messageAttributes": {},
                    "md5OfBody": message["MD5OfBody"],
                    "eventSource": "aws:sqs",
                    "eventSourceARN": self.queue_arn,
                    "awsRegion": "us-east-1",
                })
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        return {"Records": records}

    def live_vectors(self, dataset: str) -> Counter:
        """How many live segments hold each image id (1 everywhere when nothing is doubled)."""
        dataset_id = self.catalog.get_dataset(dataset).id
        held: Counter = Counter()
        for segment in self.catalog.live_segments(dataset_id):
            index = FaissVectorIndex().load(self.store.get(segment.object_key).data)
            assert len(index) == segment.vector_count
            held.update(index.ids.tolist())
        return held

    def rows(self, dataset: str) -> list[dict]:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.database_url, row_factory=dict_row) as connection:
            return connection.execute(
                "SELECT i.* FROM images i JOIN datasets d ON d.id = i.dataset_id WHERE d.name = %s"
                " ORDER BY i.id",
                (dataset,),
            ).fetchall()


def records_of(event: dict, message_ids: list[str]) -> dict:
    """The records of `event` named in a batchItemFailures response: what SQS would deliver again."""
    return {"Records": [record for record in event["Records"] if record["messageId"] in message_ids]}


def failed_ids(response: dict) -> list[str]:
    return [item["itemIdentifier"] for item in response["batchItemFailures"]]


def preprocess_function():
    return load_function("preprocess")


CONTEXT = LambdaContext(function_name="clipsearch-preprocess")


@pytest.fixture
def ingest_stack(database_url, aws_endpoint_url, s3_client, sqs_client, bucket, tiny_model_dir: Path):
    database = Database(database_url)
    migrate(database)
    queue_url = sqs_client.create_queue(QueueName=f"ingest-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    queue_arn = sqs_client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    s3_client.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={"QueueConfigurations": [{
            "QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
        }]},
    )
    files = ModelFiles.open(tiny_model_dir)
    stack = IngestStack(
        database_url, database, PostgresCatalog(database), S3ObjectStore(s3_client, bucket),
        OnnxImageEncoder.from_model_files(files, threads=1), files.model_id, s3_client, sqs_client,
        bucket, queue_url, queue_arn,
    )
    stack.drain()  # the s3:TestEvent a new configuration may send
    yield stack
    database.close()


def notification_body(event: dict) -> list[dict]:
    return [record for r in event["Records"] for record in json.loads(r["body"]).get("Records", [])]
