"""One local execution environment: a child process that imports a function's handler once, then serves events.

Started by `FunctionHost` as `python -m clipsearch_tools.local.function_runtime`, with the function's
environment only, its working directory at the function's code (LAMBDA_TASK_ROOT) and, when the host
caps memory with a cgroup, the cgroup to join before anything else is imported. Events and answers
cross the process boundary as JSON lines on two inherited pipes (requests in, replies out), so the
handler's own stdout and stderr stay free for its logs, which the host copies to the stack log.

Replies: {"ready": true} once the handler is imported (or {"error": {...}} when the import fails),
then one {"result": ...} or {"error": {"errorType", "errorMessage", "stackTrace"}} per event, the
shape Lambda gives a failed invocation.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import secrets
import sys
import time
import traceback
from dataclasses import dataclass


@dataclass
class LambdaContext:
    """The attributes of Lambda's context object that handlers and Powertools read."""

    function_name: str
    memory_limit_in_mb: int
    aws_request_id: str
    deadline_epoch_ms: int
    invoked_function_arn: str
    function_version: str = "$LATEST"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "local")

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self.deadline_epoch_ms - int(time.time() * 1000))


TRACE_ID_VARIABLE = "_X_AMZN_TRACE_ID"


def unsampled_trace_id() -> str:
    """An X-Ray trace header for one invocation, as Lambda's runtime sets it before each event, not sampled.

    Without it the X-Ray SDK believes init never ended and logs "Subsegment ... discarded" for every AWS
    call (two log lines per ingested image, each written by the instance and copied by the supervisor).
    Not sampled: nothing is sent to an X-Ray daemon, as for the unsampled majority of invocations in AWS.
    """
    return f"Root=1-{int(time.time()):08x}-{secrets.token_hex(12)};Parent={secrets.token_hex(8)};Sampled=0"


def _error(kind: str, error: BaseException) -> dict:
    return {"error": {"errorType": kind, "errorMessage": str(error),
                      "stackTrace": traceback.format_exception(error)}}


def _load_handler(handler: str):
    module_name, _, attribute = handler.rpartition(".")
    sys.path.insert(0, os.getcwd())  # LAMBDA_TASK_ROOT first, as Lambda's runtime does
    module = importlib.import_module(module_name)
    function = getattr(module, attribute, None)
    if not callable(function):
        raise AttributeError(f"module {module_name!r} has no function {attribute!r}")
    return function


def serve(handler_name: str, requests, replies) -> None:
    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    try:
        handler = _load_handler(handler_name)
    except Exception as error:  # noqa: BLE001 - reported to the host as Lambda's init error
        reply(_error(f"Runtime.ImportModuleError: {type(error).__name__}", error))
        return
    reply({"ready": True})
    for line in requests:
        request = json.loads(line)
        os.environ[TRACE_ID_VARIABLE] = unsampled_trace_id()
        context = LambdaContext(
            function_name=os.environ["AWS_LAMBDA_FUNCTION_NAME"],
            memory_limit_in_mb=int(os.environ["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"]),
            aws_request_id=request["request_id"],
            deadline_epoch_ms=request["deadline_epoch_ms"],
            invoked_function_arn=request["function_arn"],
        )
        try:
            result = handler(request["event"], context)
        except Exception as error:  # noqa: BLE001 - a failed invocation, the environment lives on
            encoded = json.dumps(_error(type(error).__name__, error))
        else:
            try:
                encoded = json.dumps({"result": result})
            except (TypeError, ValueError) as error:
                encoded = json.dumps(_error("Runtime.MarshalError", error))
        sys.stdout.flush()
        sys.stderr.flush()
        replies.write(encoded + "\n")
        replies.flush()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m clipsearch_tools.local.function_runtime")
    parser.add_argument("--handler", required=True)
    parser.add_argument("--requests-fd", type=int, required=True)
    parser.add_argument("--replies-fd", type=int, required=True)
    parser.add_argument("--cgroup", help="a cgroup (v1 memory) directory to join before the handler loads")
    args = parser.parse_args()
    if args.cgroup:
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w", encoding="ascii") as procs:
            procs.write(str(os.getpid()))
    with os.fdopen(args.requests_fd, "r", encoding="utf-8") as requests, \
            os.fdopen(args.replies_fd, "w", encoding="utf-8") as replies:
        serve(args.handler, requests, replies)


if __name__ == "__main__":
    main()
