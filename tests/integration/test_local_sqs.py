"""The local stack's SQS stand-in (moto's server, lightened) answers as moto does and keeps connections open."""

from __future__ import annotations

import http.client
import uuid

import pytest
from clipsearch.aws import aws_client
from clipsearch_tools.local.sqs import start_sqs_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_sqs():
    server = start_sqs_server()
    host, port = server.get_host_and_port()
    yield host, port, aws_client("sqs", "us-east-1", f"http://{host}:{port}", "local", "local", max_attempts=1)
    server.stop()


def test_a_connection_stays_open_for_the_next_request(local_sqs):
    host, port, sqs = local_sqs
    sqs.create_queue(QueueName="keep-alive")
    connection = http.client.HTTPConnection(host, port, timeout=10)
    body = "Action=ListQueues&Version=2012-11-05"
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               "Authorization": "AWS4-HMAC-SHA256 Credential=local/20260101/us-east-1/sqs/aws4_request, "
                                "SignedHeaders=host, Signature=0"}
    answers = []
    for _ in range(3):
        connection.request("POST", "/", body=body, headers=headers)
        response = connection.getresponse()
        answers.append((response.status, b"keep-alive" in response.read()))
        assert connection.sock is not None, "the server closed the connection after answering"
    assert answers == [(200, True)] * 3
    connection.close()


def test_sends_count_and_deduplicate_as_moto_does(local_sqs):
    _, _, sqs = local_sqs
    standard = sqs.create_queue(QueueName=f"standard-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    sqs.send_message_batch(QueueUrl=standard, Entries=[{"Id": str(n), "MessageBody": "same"} for n in range(3)])
    sqs.send_message(QueueUrl=standard, MessageBody="same")
    counts = sqs.get_queue_attributes(QueueUrl=standard, AttributeNames=["All"])["Attributes"]
    assert counts["ApproximateNumberOfMessages"] == "4"
    assert "ContentBasedDeduplication" not in counts

    fifo = sqs.create_queue(QueueName=f"dedup-{uuid.uuid4().hex[:8]}.fifo",
                            Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"})["QueueUrl"]
    for _ in range(3):
        sqs.send_message(QueueUrl=fifo, MessageBody="one body", MessageGroupId="g")
    sqs.send_message(QueueUrl=fifo, MessageBody="another body", MessageGroupId="g")
    attributes = sqs.get_queue_attributes(QueueUrl=fifo, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "2"
    assert attributes["ContentBasedDeduplication"] == "true"

    explicit = sqs.create_queue(QueueName=f"explicit-{uuid.uuid4().hex[:8]}.fifo",
                                Attributes={"FifoQueue": "true"})["QueueUrl"]
    with pytest.raises(sqs.exceptions.ClientError, match="ContentBasedDeduplication"):
        sqs.send_message(QueueUrl=explicit, MessageBody="no id", MessageGroupId="g")
