"""The local function host under Lambda's limits: memory, timeout, /tmp budget, environment, concurrency.

Each test writes a small template and handler, then runs them in real child processes; memory is
capped by a real cgroup where this machine allows it (and by the RSS watchdog in its own test).
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from clipsearch_tools.local.function_environment import FunctionEnvironment
from clipsearch_tools.local.functions import FunctionError, FunctionHost, MemoryCgroups
from clipsearch_tools.local.queue_runner import QueueRunner
from clipsearch_tools.local.state import StackState
from clipsearch_tools.local.template import load_template

pytestmark = pytest.mark.integration

HANDLER = '''
import json
import os
import time

INSTANCE_STARTED = time.time()


def handler(event, context):
    action = event.get("action")
    if "Records" in event:  # an SQS batch: each body is an action
        for record in event["Records"]:
            if record["body"] == "big":
                action = "allocate"
    if action == "allocate":
        hoard = [b"\x01" * (16 * 1024 * 1024) for _ in range(64)]  # 1 GiB, every page written
        time.sleep(1)  # held, as a real handler holds its model: a watchdog has time to see it
        return len(hoard)
    if action == "sleep":
        time.sleep(event["seconds"])
    if action == "write_tmp":
        with open(os.path.join(os.environ["TMPDIR"], "blob"), "wb") as blob:
            blob.write(os.urandom(event["bytes"]))
    if action == "fail":
        raise ValueError("as asked")
    return {"pid": os.getpid(), "environment": dict(os.environ), "started": INSTANCE_STARTED,
            "remaining_ms": context.get_remaining_time_in_millis(), "memory": context.memory_limit_in_mb,
            "request_id": context.aws_request_id}
'''

TEMPLATE = """
Parameters:
  LogLevel: {Type: String, Default: DEBUG}
  SecretArn: {Type: String}
Globals:
  Function:
    Timeout: 2
    MemorySize: 256
    Environment:
      Variables:
        CLIPSEARCH_BUCKET: !Ref Bucket
        CLIPSEARCH_MODEL_ID: some-model
        CLIPSEARCH_DB_SECRET_ARN: !Ref SecretArn
        LOG_LEVEL: !Ref LogLevel
        SHARED: from-globals
Resources:
  Bucket: {Type: AWS::S3::Bucket}
  Queue: {Type: AWS::SQS::Queue}
  Worker:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/probe/
      Handler: app.handler
      MemorySize: 128
      Environment: {Variables: {CLIPSEARCH_ONNX_THREADS: "2", SHARED: from-function}}
      Events:
        Work:
          Type: SQS
          Properties: {Queue: !GetAtt Queue.Arn, ScalingConfig: {MaximumConcurrency: 3}}
  Probe:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/probe/
      Handler: app.handler
      Timeout: 1
      EphemeralStorage: {Size: 1}
      Events:
        Call: {Type: HttpApi, Properties: {Path: /probe, Method: POST}}
"""


@pytest.fixture
def template(tmp_path: Path):
    (tmp_path / "functions" / "probe").mkdir(parents=True)
    (tmp_path / "functions" / "probe" / "app.py").write_text(textwrap.dedent(HANDLER))
    (tmp_path / "template.yaml").write_text(TEMPLATE)
    return load_template(tmp_path / "template.yaml")


@pytest.fixture
def state(tmp_path: Path) -> StackState:
    return StackState(status="ready", home=str(tmp_path), pid=0, log_file=str(tmp_path / "stack.log"),
                      bucket="local-bucket", model_id="local-model", database_url="postgresql://local/db",
                      s3_endpoint_url="http://127.0.0.1:1", sqs_endpoint_url="http://127.0.0.1:2",
                      queue_url="http://127.0.0.1:2/queue")


@pytest.fixture
def host(tmp_path: Path, state: StackState):
    host = FunctionHost(FunctionEnvironment(state, {"Worker": {"CLIPSEARCH_ONNX_THREADS": "1"}}),
                        runtime_dir=tmp_path / "runtime")
    yield host
    host.stop()


def test_a_function_sees_only_its_template_environment_and_lambdas_own_variables(
    template, host, tmp_path, monkeypatch
):
    monkeypatch.setenv("CLIPSEARCH_STACK_ONLY", "must not leak")
    monkeypatch.setenv("CLIPSEARCH_QUEUE_URL", "the stack's own")
    worker = template.functions["Worker"]
    answer = host.invoke(worker, {})
    environment = answer["environment"]
    assert "CLIPSEARCH_STACK_ONLY" not in environment
    assert "CLIPSEARCH_QUEUE_URL" not in environment  # the template does not give it to this function
    assert environment["SHARED"] == "from-function"  # the function's own variables override Globals'
    assert environment["LOG_LEVEL"] == "DEBUG"  # a parameter's default
    assert environment["CLIPSEARCH_BUCKET"] == "local-bucket"  # !Ref Bucket, resolved by the stack
    assert environment["CLIPSEARCH_MODEL_ID"] == "local-model"  # the stack's model, not the template's literal
    assert "CLIPSEARCH_DB_SECRET_ARN" not in environment
    assert environment["CLIPSEARCH_DATABASE_URL"] == "postgresql://local/db"  # the secret's local stand-in
    assert environment["CLIPSEARCH_ONNX_THREADS"] == "1"  # the local override of the template's "2"
    assert environment["CLIPSEARCH_S3_ENDPOINT_URL"] == "http://127.0.0.1:1"
    assert environment["AWS_LAMBDA_FUNCTION_NAME"] == "Worker"
    assert environment["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "128" and answer["memory"] == 128
    assert environment["LAMBDA_TASK_ROOT"] == str(tmp_path / "functions" / "probe")
    instance_tmp = Path(environment["TMPDIR"])
    assert instance_tmp.is_dir() and instance_tmp.is_relative_to(tmp_path / "runtime")
    assert environment["CLIPSEARCH_MODEL_CACHE_DIR"] == str(instance_tmp / "clipsearch" / "models")
    assert 0 < answer["remaining_ms"] <= 2000  # Globals' Timeout


def test_an_instance_is_warm_between_events_and_a_handler_error_does_not_end_it(template, host):
    probe = template.functions["Probe"]
    first = host.invoke(probe, {})
    with pytest.raises(FunctionError) as failed:
        host.invoke(probe, {"action": "fail"})
    assert failed.value.error_type == "ValueError" and failed.value.error_message == "as asked"
    assert any("raise ValueError" in line for line in failed.value.stack_trace)
    second = host.invoke(probe, {})
    assert (second["pid"], second["started"]) == (first["pid"], first["started"])
    assert second["request_id"] != first["request_id"]
    assert host.instances(probe) == 1


def test_each_invocation_gets_its_own_unsampled_trace_header_as_lambdas_runtime_sets_it(template, host):
    """Without one, the X-Ray SDK logged "Subsegment ... discarded" for every AWS call (two lines per image)."""
    probe = template.functions["Probe"]
    headers = [host.invoke(probe, {})["environment"]["_X_AMZN_TRACE_ID"] for _ in range(2)]
    assert headers[0] != headers[1]
    for header in headers:
        root, parent, sampled = header.split(";")
        assert root.startswith("Root=1-") and len(root) == len("Root=1-") + 8 + 1 + 24
        assert parent.startswith("Parent=") and sampled == "Sampled=0"


def test_a_timed_out_invocation_fails_like_lambdas_and_the_instance_is_replaced(template, host):
    probe = template.functions["Probe"]
    before = host.invoke(probe, {})
    started = time.monotonic()
    with pytest.raises(FunctionError) as timed_out:
        host.invoke(probe, {"action": "sleep", "seconds": 30})
    assert time.monotonic() - started < 5
    assert timed_out.value.error_type == "Sandbox.Timedout"
    assert timed_out.value.error_message.endswith("Task timed out after 1.00 seconds")
    after = host.invoke(probe, {})
    assert after["pid"] != before["pid"]
    assert not Path(before["environment"]["TMPDIR"]).exists()  # the discarded instance's /tmp is gone


def test_over_its_ephemeral_storage_an_invocation_fails_and_the_tmp_dir_is_cleaned(template, host):
    probe = template.functions["Probe"]
    fits = host.invoke(probe, {"action": "write_tmp", "bytes": 512 * 1024})  # within the 1 MB budget
    assert fits is not None
    with pytest.raises(FunctionError) as exceeded:
        host.invoke(probe, {"action": "write_tmp", "bytes": 3 * 1024 * 1024})
    assert exceeded.value.error_type == "Runtime.EphemeralStorageExceeded"
    assert "over the function's EphemeralStorage of 1 MB" in exceeded.value.error_message
    tmp = Path(host.invoke(probe, {})["environment"]["TMPDIR"])
    assert list(tmp.iterdir()) == []  # a new instance with an empty /tmp


@pytest.mark.parametrize("capped_by", ["cgroup", "watchdog"])
def test_over_its_memory_an_instance_is_killed_and_reported_like_lambda(template, tmp_path, state, capped_by):
    cgroups = MemoryCgroups.create()
    if capped_by == "cgroup" and cgroups is None:
        pytest.skip("memory cgroups are not writable on this machine")
    if cgroups is not None:
        cgroups.remove()
    host = FunctionHost(FunctionEnvironment(state), runtime_dir=tmp_path / "runtime",
                        memory_cgroups=capped_by == "cgroup")
    worker = template.functions["Worker"]  # MemorySize 128
    try:
        before = host.invoke(worker, {})
        with pytest.raises(FunctionError) as killed:
            host.invoke(worker, {"action": "allocate"})
        assert killed.value.error_type == "Runtime.OutOfMemory"
        assert killed.value.error_message == "Runtime exited with error: signal: killed"
        after = host.invoke(worker, {})
        assert after["pid"] != before["pid"]
        assert host.instances(worker) == 1
    finally:
        host.stop()


def test_a_batch_over_memory_is_retried_then_dead_lettered_while_others_are_indexed(template, host, sqs_client):
    dead = sqs_client.create_queue(QueueName=f"dlq-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    dead_arn = sqs_client.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = sqs_client.create_queue(
        QueueName=f"q-{uuid.uuid4().hex[:8]}",
        Attributes={"VisibilityTimeout": "1",
                    "RedrivePolicy": json.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": "3"})},
    )["QueueUrl"]
    sqs_client.send_message(QueueUrl=queue, MessageBody="big")
    worker = template.functions["Worker"]
    outcomes: list[str] = []

    def invoke(event: dict):
        try:
            host.invoke(worker, event)
        except FunctionError as error:
            outcomes.append(error.error_type)
            raise
        outcomes.append("ok")

    runner = QueueRunner(sqs_client, queue, "arn:aws:sqs:us-east-1:000000000000:q", invoke, 1, 0)
    runner.start()
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and _visible(sqs_client, dead) < 1:
            time.sleep(0.5)
        sqs_client.send_message(QueueUrl=queue, MessageBody="small")
        while time.monotonic() < deadline and "ok" not in outcomes:
            time.sleep(0.2)
    finally:
        runner.stop()
    assert outcomes == ["Runtime.OutOfMemory"] * 3 + ["ok"]  # three receives, then the redrive policy
    moved = sqs_client.receive_message(QueueUrl=dead, MaxNumberOfMessages=10)["Messages"]
    assert [message["Body"] for message in moved] == ["big"]
    assert _visible(sqs_client, queue) == 0


def _visible(sqs_client, queue_url: str) -> int:
    attributes = sqs_client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attributes["Attributes"]["ApproximateNumberOfMessages"])


def test_instances_of_one_function_run_events_at_once_up_to_its_concurrency(template, tmp_path, state):
    host = FunctionHost(FunctionEnvironment(state), runtime_dir=tmp_path / "runtime", concurrency={"Worker": 2})
    worker = template.functions["Worker"]
    answers: list[dict] = []
    try:
        host.invoke(worker, {})  # one warm instance; the second starts on demand below
        threads = [threading.Thread(target=lambda: answers.append(host.invoke(worker, {"action": "sleep", "seconds": 1})))
                   for _ in range(3)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    finally:
        host.stop()
    assert len({answer["pid"] for answer in answers}) == 2  # never a third instance
    assert 1.9 < elapsed < 3.5  # two at once, then the third: two rounds of one second


def test_a_drained_queue_closes_the_partial_batch_without_waiting_out_the_window(sqs_client):
    queue = sqs_client.create_queue(QueueName=f"q-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    for index in range(3):
        sqs_client.send_message(QueueUrl=queue, MessageBody=f"m{index}")
    invoked: list[tuple[float, int]] = []
    started = time.monotonic()
    runner = QueueRunner(sqs_client, queue, "arn:aws:sqs:us-east-1:000000000000:q",
                         lambda event: invoked.append((time.monotonic() - started, len(event["Records"]))),
                         batch_size=32, batching_window_seconds=20)
    runner.start()
    try:
        deadline = time.monotonic() + 15
        while not invoked and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        runner.stop()
    assert invoked, "the partial batch was not delivered within 15 s"
    seconds, records = invoked[0]
    assert records == 3
    assert seconds < 5  # one empty long poll (1 s) after the last message, not the 20 s window
