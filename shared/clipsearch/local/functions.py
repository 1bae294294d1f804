"""The functions of template.yaml loaded in-process and invoked one event at a time, as Lambda would."""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

from clipsearch.local.template import Function, TemplateError

logger = logging.getLogger(__name__)


@dataclass
class LambdaContext:
    """The attributes of Lambda's context object that handlers and Powertools read."""

    function_name: str
    timeout_seconds: int
    memory_limit_in_mb: int = 3008
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:000000000000:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_seconds - (time.monotonic() - self.started)) * 1000))


class FunctionHost:
    """Imports each function's handler once and serializes its invocations.

    One Lambda execution environment serves one event at a time; the handlers' cached services
    are written with that in mind, so the local stack keeps the same rule per function.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Callable] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def invoke(self, function: Function, event: dict):
        handler, lock = self._handler(function)
        with lock:
            context = LambdaContext(function.logical_id, function.timeout)
            return handler(event, context)

    def _handler(self, function: Function) -> tuple[Callable, threading.Lock]:
        with self._guard:
            if function.logical_id not in self._handlers:
                self._handlers[function.logical_id] = _load_handler(function)
                self._locks[function.logical_id] = threading.Lock()
            return self._handlers[function.logical_id], self._locks[function.logical_id]


def _load_handler(function: Function) -> Callable:
    module_name, _, attribute = function.handler.rpartition(".")
    source = function.code_uri / f"{module_name.replace('.', '/')}.py"
    if not source.is_file():
        raise TemplateError(f"{function.logical_id}: handler module {source} does not exist")
    # Every function's module is called `app`: give each its own name so they do not replace each other.
    spec = importlib.util.spec_from_file_location(f"clipsearch_local_{function.logical_id}", source)
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = getattr(module, attribute, None)
    if not callable(handler):
        raise TemplateError(f"{function.logical_id}: {source} has no function {attribute!r}")
    logger.info("loaded %s from %s", function.handler, source)
    return handler
