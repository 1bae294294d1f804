"""The local Lambda Invoke API on 127.0.0.1: a function calls another (search -> its shard searchers) as in AWS.

Serves `POST /2015-03-31/functions/<name>/invocations` (RequestResponse only) for the template's functions,
named by logical id or by an ARN ending in it, and runs them on the stack's FunctionHost, so boto3's
`invoke` pointed here (CLIPSEARCH_LAMBDA_ENDPOINT_URL) gets what Lambda answers: 200 with the handler's
JSON, or 200 with `X-Amz-Function-Error: Unhandled` and {"errorType", "errorMessage"} when it failed;
404 ResourceNotFoundException for a function the template lacks.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from clipsearch_tools.local.functions import FunctionError
from clipsearch_tools.local.template import Function

logger = logging.getLogger(__name__)

_PATH_PREFIX = "/2015-03-31/functions/"
_PATH_SUFFIX = "/invocations"


class LocalLambdaApi:
    def __init__(self, functions: Mapping[str, Function], invoke: Callable[[Function, dict], object]) -> None:
        self._functions = dict(functions)
        self._invoke = invoke
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                status, headers, body = api.answer(self.path, self.headers.get("X-Amz-Invocation-Type"),
                                                   self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json",
                                    "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
                logger.debug("lambda api: " + format, *args)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="lambda-api", daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, path: str, invocation_type: str | None, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one Invoke request."""
        if not (path.startswith(_PATH_PREFIX) and path.split("?")[0].endswith(_PATH_SUFFIX)):
            return _error(404, "UnknownOperationException", f"no such operation: POST {path}")
        name = path.split("?")[0][len(_PATH_PREFIX):-len(_PATH_SUFFIX)].rpartition(":function:")[2].split(":")[0]
        function = self._functions.get(name)
        if function is None:
            return _error(404, "ResourceNotFoundException", f"Function not found: {name}")
        if invocation_type not in (None, "RequestResponse"):
            return _error(400, "InvalidParameterValueException", "the local stack invokes RequestResponse only")
        try:
            event = json.loads(body or b"{}")
        except ValueError:
            return _error(400, "InvalidRequestContentException", "Could not parse request body into json")
        try:
            result = self._invoke(function, event)
        except FunctionError as error:
            failure = {"errorType": error.error_type, "errorMessage": error.error_message,
                       "stackTrace": error.stack_trace}
            return 200, {"X-Amz-Function-Error": "Unhandled"}, json.dumps(failure).encode()
        return 200, {"X-Amz-Executed-Version": "$LATEST"}, json.dumps(result).encode()


def _error(status: int, error_type: str, message: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"x-amzn-ErrorType": error_type}, json.dumps({"Type": "User", "message": message}).encode()
