"""The local stack reads routes, the queue source, schedules and notifications from template.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
from clipsearch_tools.local.template import TemplateError, load_template

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
Parameters:
  Every:
    Type: String
    Default: rate(5 minutes)
Globals:
  Function:
    Timeout: 7
Resources:
  Queue:
    Type: AWS::SQS::Queue
    Properties:
      VisibilityTimeout: 42
      RedrivePolicy:
        deadLetterTargetArn: !GetAtt Dead.Arn
        maxReceiveCount: 3
  Dead:
    Type: AWS::SQS::Queue
  Bucket:
    Type: AWS::S3::Bucket
    Properties:
      NotificationConfiguration:
        QueueConfigurations:
          - Event: s3:ObjectCreated:*
            Queue: !GetAtt Queue.Arn
            Filter: {S3Key: {Rules: [{Name: prefix, Value: in/}, {Name: suffix, Value: .jpg}]}}
  Worker:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/worker/
      Handler: app.handler
      Events:
        Work:
          Type: SQS
          Properties: {Queue: !GetAtt Queue.Arn, BatchSize: 4, MaximumBatchingWindowInSeconds: 2}
        Tick:
          Type: Schedule
          Properties: {Schedule: !Ref Every}
        Nightly:
          Type: Schedule
          Properties: {Schedule: "cron(0 3 * * ? *)"}
  Api:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/api/
      Handler: app.handler
      Timeout: 29
      Events:
        Item: {Type: HttpApi, Properties: {Path: "/items/{item}", Method: get}}
        Items: {Type: HttpApi, Properties: {Path: /items/special, Method: GET}}
        Files: {Type: HttpApi, Properties: {Path: "/files/{proxy+}", Method: ANY}}
"""


@pytest.fixture
def minimal(tmp_path: Path):
    path = tmp_path / "template.yaml"
    path.write_text(MINIMAL)
    return load_template(path)


def test_the_repository_template_gives_the_api_routes_and_the_queue_source():
    template = load_template(REPO / "template.yaml")
    routes = {(route.function.logical_id, route.method, route.path) for route in template.routes}
    assert ("SearchFunction", "POST", "/datasets/{dataset}/search/text") in routes
    assert ("DatasetsFunction", "DELETE", "/datasets/{dataset}") in routes
    source = template.queue_source
    assert source.function.code_uri == REPO / "functions" / "preprocess"
    assert source.batch_size >= 1 and source.visibility_timeout >= 6 * source.function.timeout
    assert source.max_receive_count == 5
    assert {schedule.function.code_uri.name for schedule in template.schedules} == {
        "compact", "reconcile", "dataset_deletion"}
    (deletion,) = template.task_queue_sources  # the deletion queue is not the bucket's: a task queue
    assert (deletion.function.code_uri.name, deletion.queue_id, deletion.batch_size) == (
        "dataset_deletion", "DeletionQueue", 1)
    assert deletion.visibility_timeout > deletion.function.timeout and deletion.max_receive_count == 5
    assert template.function_for("reconcile").handler == "app.handler"
    assert all(rule.prefix == "datasets/" for rule in template.notifications)


def test_queue_source_uses_batch_window_visibility_and_redrive(minimal):
    source = minimal.queue_source
    assert (source.batch_size, source.batching_window_seconds) == (4, 2.0)
    assert (source.visibility_timeout, source.max_receive_count) == (42, 3)
    assert source.function.timeout == 7  # from Globals


def test_rate_schedules_resolve_parameter_defaults_and_cron_is_not_run(minimal):
    assert [(schedule.function.logical_id, schedule.every_seconds) for schedule in minimal.schedules] == [
        ("Worker", 300)
    ]


def test_routes_match_literal_segments_before_parameters_and_greedy_paths(minimal):
    def route_for(method: str, path: str):
        for route in minimal.routes:
            parameters = route.match(method, path)
            if parameters is not None:
                return route.path, parameters
        return None

    assert route_for("GET", "/items/special") == ("/items/special", {})
    assert route_for("GET", "/items/42") == ("/items/{item}", {"item": "42"})
    assert route_for("POST", "/items/42") is None
    assert route_for("DELETE", "/files/a/b.txt") == ("/files/{proxy+}", {"proxy": "a/b.txt"})
    assert route_for("GET", "/items/42/more") is None


def test_notification_rules_filter_by_event_prefix_and_suffix(minimal):
    (rule,) = minimal.notifications
    assert rule.matches("ObjectCreated:Put", "in/a.jpg")
    assert not rule.matches("ObjectCreated:Put", "out/a.jpg")
    assert not rule.matches("ObjectCreated:Put", "in/a.png")
    assert not rule.matches("ObjectRemoved:Delete", "in/a.jpg")


def test_a_template_without_an_sqs_function_is_refused(tmp_path: Path):
    path = tmp_path / "template.yaml"
    path.write_text("Resources:\n  Api:\n    Type: AWS::Serverless::Function\n    Properties: {CodeUri: a/}\n")
    with pytest.raises(TemplateError, match="one function with an SQS event"):
        load_template(path)


def test_a_missing_template_is_one_clear_error(tmp_path: Path):
    with pytest.raises(TemplateError, match="cannot read"):
        load_template(tmp_path / "absent.yaml")


def test_the_repository_template_gives_each_function_its_limits_and_environment():
    template = load_template(REPO / "template.yaml")
    preprocess = template.queue_source.function
    assert (preprocess.memory_size, preprocess.timeout, preprocess.ephemeral_storage) == (3008, 180, 2048)
    variables = {variable.name: variable for variable in preprocess.environment}
    assert variables["CLIPSEARCH_ONNX_THREADS"].value == "2"  # the function's own
    assert variables["POWERTOOLS_SERVICE_NAME"].value == "clipsearch"  # from Globals
    assert variables["LOG_LEVEL"].value == "INFO"  # a parameter's default
    assert variables["CLIPSEARCH_BUCKET"].value is None  # a resource: only a deployment (or the stack) knows it
    assert variables["CLIPSEARCH_BUCKET"].reference == "Ref ImagesBucket"
    assert "CLIPSEARCH_QUEUE_URL" not in variables  # only the reconciliation function is given the queue
    assert "CLIPSEARCH_QUEUE_URL" in {variable.name for variable in template.function_for("reconcile").environment}
    datasets = template.function_for("datasets")
    assert (datasets.memory_size, datasets.timeout, datasets.ephemeral_storage) == (512, 29, 512)  # Globals, Lambda
    assert template.queue_source.maximum_concurrency == 10  # PreprocessMaxConcurrency's default
