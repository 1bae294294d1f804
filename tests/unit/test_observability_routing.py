"""The function decorator routes the runtime's loggers through the function's Logger for one invocation only."""

from __future__ import annotations

import io
import json
import logging
import uuid
from dataclasses import dataclass

import pytest
from clipsearch.observability import FunctionTelemetry, observed_handler, runtime_logs_through

pytestmark = pytest.mark.unit

RUNTIME = logging.getLogger("clipsearch")


@dataclass
class LambdaContext:
    function_name: str = "clipsearch-test"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:clipsearch-test"
    aws_request_id: str = "request-1"


@pytest.fixture
def telemetry(monkeypatch: pytest.MonkeyPatch) -> FunctionTelemetry:
    """A function's telemetry (its own service, so a Logger of its own) writing its lines to a buffer."""
    monkeypatch.delenv("LAMBDA_TASK_ROOT", raising=False)
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")  # no EMF among the log lines
    telemetry = FunctionTelemetry.for_function(f"unit-{uuid.uuid4().hex[:8]}")
    telemetry.logger.registered_handler.setStream(io.StringIO())
    telemetry.logger.setLevel("INFO")
    return telemetry


def lines(telemetry: FunctionTelemetry) -> list[dict]:
    return [json.loads(line) for line in telemetry.logger.registered_handler.stream.getvalue().splitlines()]


def http_event(request_id: str) -> dict:
    return {"requestContext": {"requestId": request_id}}


def test_a_runtime_info_line_carries_the_request_and_correlation_ids(telemetry) -> None:
    @observed_handler(telemetry, correlation_id_path="requestContext.requestId")
    def handler(event, context):
        logging.getLogger("clipsearch.search").info("dataset %s refreshed", "photos")
        return {"statusCode": 200}

    assert handler(http_event("api-1"), LambdaContext()) == {"statusCode": 200}

    [line] = lines(telemetry)
    assert line["message"] == "dataset photos refreshed" and line["level"] == "INFO"
    assert line["name"] == "clipsearch.search"
    assert (line["function_request_id"], line["correlation_id"]) == ("request-1", "api-1")
    assert line["function_name"] == "clipsearch-test"


def test_the_routing_ends_with_the_invocation(telemetry, caplog) -> None:
    before = (RUNTIME.level, list(RUNTIME.handlers), RUNTIME.propagate)

    @observed_handler(telemetry)
    def handler(event, context):
        assert RUNTIME.handlers == telemetry.logger.handlers and not RUNTIME.propagate
        return None

    handler({}, LambdaContext())

    assert (RUNTIME.level, list(RUNTIME.handlers), RUNTIME.propagate) == before
    caplog.set_level(logging.INFO, logger="clipsearch.events")
    logging.getLogger("clipsearch.events").info("after the invocation")
    assert "after the invocation" in caplog.text and lines(telemetry) == []


def test_overlapping_invocations_give_the_configuration_back_after_the_last(telemetry) -> None:
    other = FunctionTelemetry.for_function(f"unit-{uuid.uuid4().hex[:8]}")
    before = (RUNTIME.level, list(RUNTIME.handlers), RUNTIME.propagate)

    first = runtime_logs_through(telemetry.logger)
    first.__enter__()
    with runtime_logs_through(other.logger):
        assert RUNTIME.handlers == other.logger.handlers
        first.__exit__(None, None, None)  # the first ends while the second still runs
        assert RUNTIME.handlers == other.logger.handlers and not RUNTIME.propagate

    assert (RUNTIME.level, list(RUNTIME.handlers), RUNTIME.propagate) == before


def test_a_runtime_logger_that_checked_its_level_before_the_invocation_follows_the_routing(telemetry) -> None:
    """The routing empties the level caches under `clipsearch` only: one filled before the invocation, with
    the process's own level (WARNING here), must not keep answering from it, neither during nor after."""
    child = logging.getLogger("clipsearch.search.cache_probe")
    own_level = RUNTIME.level
    RUNTIME.setLevel(logging.WARNING)
    try:
        assert not child.isEnabledFor(logging.INFO)  # now in its cache

        @observed_handler(telemetry)
        def handler(event, context):
            child.info("answered from the cache?")
            return None

        handler({}, LambdaContext())

        assert [line["message"] for line in lines(telemetry)] == ["answered from the cache?"]
        assert RUNTIME.level == logging.WARNING and not child.isEnabledFor(logging.INFO)
    finally:
        RUNTIME.setLevel(own_level)


def test_a_logger_created_where_a_placeholder_stood_follows_the_routing_too(telemetry) -> None:
    """A logger made after an invocation in place of a registry placeholder (its child came first) adds no name
    to the registry: its level cache must be emptied all the same."""
    suffix = uuid.uuid4().hex[:8]
    logging.getLogger(f"clipsearch.placeholder_{suffix}.child")  # leaves a placeholder for its parent

    @observed_handler(telemetry)
    def handler(event, context):
        logging.getLogger(f"clipsearch.placeholder_{suffix}").info("routed")
        return None

    own_level = RUNTIME.level
    RUNTIME.setLevel(logging.WARNING)
    try:
        handler({}, LambdaContext())  # the registry's names seen with the placeholder
        parent = logging.getLogger(f"clipsearch.placeholder_{suffix}")
        assert not parent.isEnabledFor(logging.INFO)  # now in its cache
        handler({}, LambdaContext())
    finally:
        RUNTIME.setLevel(own_level)

    assert [line["message"] for line in lines(telemetry)] == ["routed", "routed"]


def test_a_failing_invocation_is_logged_with_its_ids_and_raised(telemetry) -> None:
    @observed_handler(telemetry, correlation_id_path="id")
    def handler(event, context):
        raise RuntimeError("segment store unreachable")

    with pytest.raises(RuntimeError, match="unreachable"):
        handler({"id": "schedule-7"}, LambdaContext(aws_request_id="request-9"))

    [line] = lines(telemetry)
    assert line["level"] == "ERROR" and line["message"] == "the invocation failed"
    assert (line["function_request_id"], line["correlation_id"]) == ("request-9", "schedule-7")
    assert "segment store unreachable" in line["exception"]


def test_tracing_is_off_outside_lambda(telemetry) -> None:
    """Inside (LAMBDA_TASK_ROOT set) it is on: tests/integration/test_observability.py runs the functions so,
    in their own processes, because an enabled Tracer patches boto3 for the whole process."""
    assert telemetry.tracer.disabled


@pytest.mark.parametrize("environment", [
    {},
    {"LAMBDA_TASK_ROOT": "/var/task"},
    {"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": "true"},
    {"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": "0"},
    {"LAMBDA_TASK_ROOT": "/var/task", "AWS_SAM_LOCAL": "true"},
    {"LAMBDA_TASK_ROOT": "/var/task", "AWS_CHALICE_CLI_MODE": "true"},
    {"POWERTOOLS_TRACE_DISABLED": "false"},
])
def test_tracing_is_on_exactly_where_powertools_would_trace(environment, monkeypatch) -> None:
    from aws_lambda_powertools import Tracer
    from clipsearch.observability import tracing_enabled

    for name in ("LAMBDA_TASK_ROOT", "POWERTOOLS_TRACE_DISABLED", "AWS_SAM_LOCAL", "AWS_CHALICE_CLI_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert tracing_enabled() is not bool(Tracer._is_tracer_disabled())


_TELEMETRY_IMPORTS = """
import json, sys
from clipsearch.observability import FunctionTelemetry, observed_handler
telemetry = FunctionTelemetry.for_function("search")
handler = observed_handler(telemetry)(lambda event, context: {"statusCode": 200})
class Context:
    function_name, memory_limit_in_mb, aws_request_id = "clipsearch-search", 512, "request-1"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:clipsearch-search"
answer = handler({}, Context())
print(json.dumps({"xray": "aws_xray_sdk.core" in sys.modules, "disabled": telemetry.tracer.disabled,
                  "answer": answer}))
"""


@pytest.mark.parametrize("in_lambda", [False, True])
def test_the_x_ray_sdk_is_imported_only_where_tracing_is_on(in_lambda: bool) -> None:
    """Off, a handler runs with a provider that records nothing; on, with Powertools' X-Ray provider."""
    import os
    import subprocess
    import sys

    environment = {name: value for name, value in os.environ.items() if name != "LAMBDA_TASK_ROOT"}
    environment.update({"POWERTOOLS_METRICS_DISABLED": "true", "AWS_REGION": "us-east-1"})
    if in_lambda:
        environment["LAMBDA_TASK_ROOT"] = "/var/task"
    result = subprocess.run([sys.executable, "-c", _TELEMETRY_IMPORTS], env=environment, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["answer"] == {"statusCode": 200}
    assert outcome["xray"] is in_lambda and outcome["disabled"] is not in_lambda
