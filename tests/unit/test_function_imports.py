"""What each function's import pulls in, in a fresh process with its Lambda environment: the runtime, never the tools.

The layer holds the runtime package and its dependencies only; a handler that imported the tools or a
tool-only dependency would fail in AWS on its first cold start. A second, static check covers imports
made later (inside functions) anywhere in the runtime package.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from clipsearch_tools.local.function_environment import FunctionEnvironment
from clipsearch_tools.local.functions import lambda_runtime_environment
from clipsearch_tools.local.state import StackState
from clipsearch_tools.local.template import load_template

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
RUNTIME_PACKAGE = REPO / "shared" / "clipsearch"
# The tools, and packages the layer does not carry: tool-only, test-only and export-only.
NEVER_IN_A_FUNCTION = ("clipsearch_tools", "yaml", "tqdm", "moto", "torch", "transformers", "optimum")
# The datasets function and the deletion worker work from the catalog and the bucket alone: no model, no index.
NOT_IN_DATASETS = ("onnxruntime", "faiss")
# The search function answers text queries without decoding an image: Pillow comes with the first image query.
NOT_IN_SEARCH = ("PIL",)

# Imports the handler's module as Lambda's runtime does (LAMBDA_TASK_ROOT, the working directory, first
# on sys.path), waits for the init threads it started (the search function's, clipsearch.wiring; they import
# beside the handler's module), then prints every top-level package now imported.
_IMPORT_HANDLER = """
import importlib, json, os, sys, threading, time
sys.path.insert(0, os.environ["LAMBDA_TASK_ROOT"])
module_name, _, attribute = os.environ["_HANDLER"].rpartition(".")
assert callable(getattr(importlib.import_module(module_name), attribute))
deadline = time.monotonic() + 60
for thread in threading.enumerate():
    if thread.name.startswith("init-"):
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not thread.is_alive(), f"{thread.name} still running after 60 s"
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))
"""


class _NoSuchKey(BaseHTTPRequestHandler):
    """An S3 endpoint holding nothing: the search function's init finds no model at once (a closed port
    would have botocore retry for seconds), so its init threads end after their imports."""

    def _missing(self) -> None:
        body = b"<Error><Code>NoSuchKey</Code><Message>missing</Message></Error>"
        self.send_response(404)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _missing

    def log_message(self, *args) -> None:  # no access log on the test's stderr
        pass


@pytest.fixture(scope="module")
def empty_s3_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchKey)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


TEMPLATE = load_template(REPO / "template.yaml")
FUNCTIONS = sorted(TEMPLATE.functions.values(), key=lambda function: function.logical_id)


def _imported_packages(function, tmp_path: Path, s3_endpoint_url: str) -> tuple[set[str], str]:
    """The top-level packages imported once the handler's module and its init threads are done, and stderr."""
    state = StackState(status="ready", home=str(tmp_path), pid=0, log_file=str(tmp_path / "stack.log"),
                       bucket="images", model_id="tiny", database_url="postgresql://127.0.0.1:1/catalog",
                       s3_endpoint_url=s3_endpoint_url, sqs_endpoint_url="http://127.0.0.1:2",
                       queue_url="http://127.0.0.1:2/queue", task_queues={"DeletionQueue": "http://127.0.0.1:2/deletions"})
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    environment = {**FunctionEnvironment(state)(function, tmp_dir),
                   **lambda_runtime_environment(function, f"{function.logical_id}-imports", tmp_dir)}
    result = subprocess.run([sys.executable, "-c", _IMPORT_HANDLER], env=environment, cwd=function.code_uri,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return set(json.loads(result.stdout.splitlines()[-1])), result.stderr


def test_the_template_declares_every_function_directory():
    assert {function.code_uri for function in FUNCTIONS} == {path.parent for path in (REPO / "functions").glob("*/app.py")}


@pytest.mark.parametrize("function", FUNCTIONS, ids=[function.logical_id for function in FUNCTIONS])
def test_a_function_imports_the_runtime_and_no_tool(function, tmp_path: Path, empty_s3_endpoint: str):
    imported, stderr = _imported_packages(function, tmp_path, empty_s3_endpoint)
    assert "clipsearch" in imported and "aws_lambda_powertools" in imported
    assert not imported & set(NEVER_IN_A_FUNCTION), sorted(imported & set(NEVER_IN_A_FUNCTION))
    if function.code_uri.name in ("datasets", "dataset_deletion"):
        assert not imported & set(NOT_IN_DATASETS), sorted(imported & set(NOT_IN_DATASETS))
    if function.code_uri.name == "search":
        # Both init threads got as far as this environment lets them (no model in the bucket, no database), so
        # their imports are all in: the search service's adapters, the text model's runtime.
        assert "opening the catalog during init failed" in stderr, stderr[-4000:]
        assert "loading the text model during init failed: model 'tiny' has no models/tiny/manifest.json" in stderr, (
            stderr[-4000:])
        assert not imported & set(NOT_IN_SEARCH), sorted(imported & set(NOT_IN_SEARCH))


def _imported_names(source: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), filename=str(source))):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_no_runtime_module_imports_a_tool_anywhere():
    sources = sorted(RUNTIME_PACKAGE.rglob("*.py"))
    assert RUNTIME_PACKAGE / "wiring.py" in sources
    offenders = {
        str(source.relative_to(REPO)): sorted(_imported_names(source) & set(NEVER_IN_A_FUNCTION))
        for source in sources
    }
    assert {path: names for path, names in offenders.items() if names} == {}
