"""The local stack's parts over real services: SeaweedFS events into SQS, the queue runner, the HTTP gateway."""

from __future__ import annotations

import io
import json
import os
import socket
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from clipsearch.events import EventKind, parse_message
from clipsearch_tools.local.functions import FunctionHost
from clipsearch_tools.local.gateway import LocalGateway
from clipsearch_tools.local.ports import free_ports
from clipsearch_tools.local.queue_runner import QueueRunner
from clipsearch_tools.local.seaweed import (
    _PORT_FLAGS,
    FilerEventFeed,
    ObjectStorageUnavailable,
    SeaweedServer,
    find_weed,
)
from clipsearch_tools.local.template import Function, NotificationRule, load_template

pytestmark = pytest.mark.integration

KEYS = ("clipsearch-test", "clipsearch-test-secret")
RULES = (NotificationRule("s3:ObjectCreated:*", "datasets/", ""), NotificationRule("s3:ObjectRemoved:*", "datasets/", ""))


def _s3(url: str):
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id=KEYS[0], aws_secret_access_key=KEYS[1])


def _skip_without_weed() -> None:
    try:
        find_weed()
    except ObjectStorageUnavailable as error:
        pytest.skip(str(error))


@pytest.fixture
def seaweed(tmp_path: Path):
    _skip_without_weed()
    server = SeaweedServer(tmp_path / "objects", tmp_path / "weed.log", *KEYS)
    server.start(_s3)
    yield server
    server.stop()


@pytest.fixture
def queue_url(sqs_client) -> str:
    return sqs_client.create_queue(QueueName=f"q-{uuid.uuid4().hex[:8]}")["QueueUrl"]


def _drain(sqs_client, queue_url: str, expected: int, timeout: float = 20) -> list:
    events, deadline = [], time.monotonic() + timeout
    while len(events) < expected and time.monotonic() < deadline:
        for message in sqs_client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                                  WaitTimeSeconds=1).get("Messages", []):
            events += parse_message(message["MessageId"], message["Body"])
            sqs_client.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return events


def test_seaweed_changes_reach_the_queue_as_s3_notifications(seaweed, sqs_client, queue_url, tmp_path):
    s3 = _s3(seaweed.s3_url)
    s3.create_bucket(Bucket="images")
    feed = FilerEventFeed(seaweed, "images", RULES,
                          lambda body: sqs_client.send_message(QueueUrl=queue_url, MessageBody=body), tmp_path / "tail.log")
    feed.start()
    try:
        put = s3.put_object(Bucket="images", Key="datasets/d/a b.jpg", Body=b"one")
        s3.put_object(Bucket="images", Key="models/m/manifest.json", Body=b"{}")  # outside the prefix
        s3.upload_fileobj(io.BytesIO(b"z" * (6 * 1024 * 1024)), "images", "datasets/d/big.jpg",
                          Config=TransferConfig(multipart_threshold=5 * 1024 * 1024,
                                                multipart_chunksize=5 * 1024 * 1024))
        big = s3.head_object(Bucket="images", Key="datasets/d/big.jpg")
        s3.delete_object(Bucket="images", Key="datasets/d/a b.jpg")
        events = _drain(sqs_client, queue_url, 3)
    finally:
        feed.stop()
    assert [(event.kind, event.key) for event in events] == [
        (EventKind.CREATED, "datasets/d/a b.jpg"),
        (EventKind.CREATED, "datasets/d/big.jpg"),
        (EventKind.REMOVED, "datasets/d/a b.jpg"),
    ]
    assert events[0].etag == put["ETag"].strip('"')
    assert events[1].etag == big["ETag"].strip('"') and events[1].etag.endswith("-2")  # md5 of the parts
    assert _drain(sqs_client, queue_url, 1, timeout=2) == []


def _tails_following(filer_address: str) -> int:
    """How many `weed filer.meta.tail` processes follow this filer."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        count += b"filer.meta.tail" in arguments and f"-filer={filer_address}".encode() in arguments
    return count


def test_a_failed_send_restarts_the_feed_without_leaving_the_old_tail_running(seaweed, tmp_path):
    s3 = _s3(seaweed.s3_url)
    s3.create_bucket(Bucket="flaky")
    sent: list[str] = []

    def send_failing_once(body: str) -> None:
        sent.append(body)
        if len(sent) == 1:
            raise ConnectionError("the queue is unreachable")

    feed = FilerEventFeed(seaweed, "flaky", RULES, send_failing_once, tmp_path / "tail.log")
    feed.start()
    try:
        s3.put_object(Bucket="flaky", Key="datasets/d/x.jpg", Body=b"one")
        deadline = time.monotonic() + 20
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(sent) == 2, "the change whose send failed was not sent again after the restart"
        assert sent[0] == sent[1]
        assert _tails_following(seaweed.filer_address) == 1
    finally:
        feed.stop()
    assert _tails_following(seaweed.filer_address) == 0


def test_seaweed_keeps_objects_across_a_restart(tmp_path: Path, seaweed):
    s3 = _s3(seaweed.s3_url)
    s3.create_bucket(Bucket="kept")
    s3.put_object(Bucket="kept", Key="datasets/d/x.jpg", Body=b"persisted", Metadata={"source-path": "/p/x.jpg"})
    seaweed.stop()
    again = SeaweedServer(seaweed.data_dir, seaweed.log_file, *KEYS)
    again.start(_s3)
    try:
        stored = _s3(again.s3_url).get_object(Bucket="kept", Key="datasets/d/x.jpg")
        assert stored["Body"].read() == b"persisted"
        assert stored["Metadata"] == {"source-path": "/p/x.jpg"}
    finally:
        again.stop()


def _listening() -> socket.socket:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def test_seaweed_launches_again_on_other_ports_when_one_it_was_given_is_taken(tmp_path: Path, caplog):
    with _listening() as taken:
        port_choices: list[list[int]] = []

        def first_choice_taken(count: int) -> list[int]:
            ports = free_ports(count)
            if not port_choices:  # the master's port, bound by someone else meanwhile
                ports[_PORT_FLAGS.index("master.port")] = taken.getsockname()[1]
            port_choices.append(ports)
            return ports

        launched: list[int] = []
        server = SeaweedServer(tmp_path / "objects", tmp_path / "weed.log", *KEYS, choose_ports=first_choice_taken)
        server.start(_s3, on_launched=launched.append)
        try:
            assert len(port_choices) == 2 and len(launched) == 2
            assert launched[-1] == server.process.pid and server.alive
            assert server.s3_port == port_choices[1][_PORT_FLAGS.index("s3.port")]
            assert _s3(server.s3_url).list_buckets()["Buckets"] == []
            assert "launching it on other ports" in caplog.text
            assert f"port {taken.getsockname()[1]}" in caplog.text  # weed's reason, from its log
        finally:
            server.stop()


def test_seaweed_that_keeps_exiting_at_start_is_reported_with_its_log(tmp_path: Path):
    with _listening() as taken:
        taken_port = taken.getsockname()[1]

        def always_taken(count: int) -> list[int]:
            ports = free_ports(count)
            ports[_PORT_FLAGS.index("master.port")] = taken_port
            return ports

        server = SeaweedServer(tmp_path / "objects", tmp_path / "weed.log", *KEYS, choose_ports=always_taken)
        with pytest.raises(ObjectStorageUnavailable, match=r"during its start, 3 times") as failure:
            server.start(_s3)
    assert f"port {taken_port}" in str(failure.value)  # weed's own words, from its log
    assert not server.alive


def test_seaweed_not_ready_in_time_is_stopped(tmp_path: Path):
    _skip_without_weed()
    server = SeaweedServer(tmp_path / "objects", tmp_path / "weed.log", *KEYS)
    try:
        with pytest.raises(ObjectStorageUnavailable, match="not ready after 0 s"):
            server.start(_s3, timeout=0)
        assert server.process is not None and not server.alive
    finally:
        server.stop()


def test_seaweed_refuses_other_credentials(seaweed):
    stranger = boto3.client("s3", endpoint_url=seaweed.s3_url, region_name="us-east-1",
                            aws_access_key_id="someone", aws_secret_access_key="else")
    with pytest.raises(Exception, match="InvalidAccessKeyId"):
        stranger.list_buckets()


def test_queue_runner_deletes_done_messages_and_dead_letters_a_failing_one(sqs_client):
    dead = sqs_client.create_queue(QueueName=f"dlq-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    dead_arn = sqs_client.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = sqs_client.create_queue(
        QueueName=f"q-{uuid.uuid4().hex[:8]}",
        Attributes={"VisibilityTimeout": "1",
                    "RedrivePolicy": json.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": "5"})},
    )["QueueUrl"]
    for body in ("good-1", "good-2", "poison"):
        sqs_client.send_message(QueueUrl=queue, MessageBody=body)
    batches, poison_receives = [], []

    def invoke(event: dict) -> dict:
        batches.append(event)
        failed = [record["messageId"] for record in event["Records"] if record["body"] == "poison"]
        poison_receives.extend(record["attributes"]["ApproximateReceiveCount"]
                               for record in event["Records"] if record["body"] == "poison")
        return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in failed]}

    runner = QueueRunner(sqs_client, queue, "arn:aws:sqs:us-east-1:123456789012:q", invoke, 10, 0.5)
    runner.start()
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if int(sqs_client.get_queue_attributes(QueueUrl=dead, AttributeNames=["ApproximateNumberOfMessages"])
                   ["Attributes"]["ApproximateNumberOfMessages"]) == 1:
                break
            time.sleep(0.5)
    finally:
        runner.stop()
    first = batches[0]["Records"]
    assert sorted(record["body"] for record in first) == ["good-1", "good-2", "poison"]  # one batch in the window
    assert first[0]["eventSource"] == "aws:sqs" and first[0]["eventSourceARN"].endswith(":q")
    assert all(record["body"] == "poison" for batch in batches[1:] for record in batch["Records"])
    assert poison_receives == ["1", "2", "3", "4", "5"]
    moved = sqs_client.receive_message(QueueUrl=dead, MaxNumberOfMessages=10)["Messages"]
    assert [message["Body"] for message in moved] == ["poison"]


FUNCTION = '''
import json


def handler(event, context):
    if event["rawPath"].endswith("/boom"):
        raise RuntimeError("boom")
    return {"statusCode": 207, "headers": {"X-Echo": "yes", "Content-Type": "application/json"},
            "body": json.dumps({"event": event, "function": context.function_name,
                                "remaining_ms": context.get_remaining_time_in_millis()})}
'''

TEMPLATE = """
Resources:
  Queue: {Type: AWS::SQS::Queue}
  Worker:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/echo/
      Handler: app.handler
      Events: {Work: {Type: SQS, Properties: {Queue: !GetAtt Queue.Arn}}}
  Echo:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/echo/
      Handler: app.handler
      Timeout: 9
      Events:
        Item: {Type: HttpApi, Properties: {Path: "/things/{thing}", Method: POST}}
        Boom: {Type: HttpApi, Properties: {Path: /boom, Method: GET}}
"""


@pytest.fixture
def gateway(tmp_path: Path):
    (tmp_path / "functions" / "echo").mkdir(parents=True)
    (tmp_path / "functions" / "echo" / "app.py").write_text(textwrap.dedent(FUNCTION))
    (tmp_path / "template.yaml").write_text(TEMPLATE)
    template = load_template(tmp_path / "template.yaml")
    gateway = LocalGateway(template.routes, FunctionHost().invoke)
    gateway.start()
    yield gateway
    gateway.stop()


def _call(request: urllib.request.Request) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_gateway_invokes_the_templates_function_with_a_v2_event(gateway):
    request = urllib.request.Request(f"{gateway.url}/things/a%20b?k=3", data=b"\x89PNG\x00", method="POST",
                                     headers={"Content-Type": "image/png"})
    status, headers, body = _call(request)
    assert status == 207 and headers["x-echo"] == "yes"
    answer = json.loads(body)
    event = answer["event"]
    assert event["routeKey"] == "POST /things/{thing}"
    assert event["pathParameters"] == {"thing": "a b"}
    assert event["queryStringParameters"] == {"k": "3"}
    assert event["isBase64Encoded"] is True and event["headers"]["content-type"] == "image/png"
    assert answer["function"] == "Echo" and 0 < answer["remaining_ms"] <= 9000


def test_gateway_answers_unknown_routes_and_failed_functions_like_api_gateway(gateway):
    status, _, body = _call(urllib.request.Request(f"{gateway.url}/nowhere"))
    assert status == 404 and "no route GET /nowhere" in json.loads(body)["message"]
    status, _, body = _call(urllib.request.Request(f"{gateway.url}/things/x"))  # GET is not declared
    assert status == 404
    status, _, body = _call(urllib.request.Request(f"{gateway.url}/boom"))
    assert status == 502 and "function failed" in json.loads(body)["message"]


def test_function_host_imports_each_function_once_in_its_own_process(tmp_path: Path):
    for name in ("a", "b"):  # both modules are called `app`, as every function's is
        (tmp_path / name).mkdir()
        (tmp_path / name / "app.py").write_text(
            "import os\nLOADS = []\nLOADS.append(1)\ndef handler(event, context):\n"
            f"    return {{'loads': len(LOADS), 'name': context.function_name, 'code': '{name}', 'pid': os.getpid()}}\n"
        )
    host = FunctionHost(runtime_dir=tmp_path / "runtime")
    first, second = Function("A", tmp_path / "a", "app.handler", 3), Function("B", tmp_path / "b", "app.handler", 3)
    try:
        answers = [host.invoke(first, {}), host.invoke(second, {}), host.invoke(first, {})]
    finally:
        host.stop()
    assert [(answer["loads"], answer["name"], answer["code"]) for answer in answers] == [
        (1, "A", "a"), (1, "B", "b"), (1, "A", "a")]
    assert answers[0]["pid"] == answers[2]["pid"] != answers[1]["pid"]
    assert os.getpid() not in {answer["pid"] for answer in answers}
