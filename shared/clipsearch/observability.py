"""Each function's Powertools Logger, Metrics and Tracer, and the one decorator that puts them around a handler.

The runtime's modules log through plain `logging.getLogger(__name__)` loggers under `clipsearch`. In
Lambda the root logger's level is WARNING, so their INFO lines would be dropped, and they would lack the
request and correlation ids. While a handler runs, `observed_handler` gives the `clipsearch` logger the
function Logger's level and handlers (what Powertools' `copy_config_to_registered_loggers` does, without
emptying every logger's level cache), so every line is the function's JSON with its ids; afterwards the
logger gets its own configuration back. Scoping it to
the invocation keeps processes that load a handler next to other work (the CLI's in-process
reconciliation, the local stack, the test suite) from having their logging rerouted for good.

Where tracing is off (outside Lambda, or POWERTOOLS_TRACE_DISABLED), the Tracer gets a provider that
records nothing: Powertools' own Tracer imports the X-Ray SDK even then, whose recorder builds two
botocore X-Ray clients as it imports (~0.3 s of a search function's cold start, on no request's behalf).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.tracing.base import BaseProvider, BaseSegment

METRICS_NAMESPACE = "clipsearch"  # template.yaml's POWERTOOLS_METRICS_NAMESPACE
RUNTIME_LOGGER = "clipsearch"

# Cache lookups, one data point per lookup: 1 for a hit, 0 for a miss, so the Average is the hit ratio
# and the SampleCount the number of lookups. Keys are clipsearch.search's cache names.
CACHE_HIT_METRICS = {"encoder": "ModelCacheHit", "index": "SegmentCacheHit"}
QUERY_LATENCY_METRICS = {"text": "TextQueryLatency", "image": "ImageQueryLatency"}

Handler = Callable[[dict, object], object]


@dataclass(frozen=True)
class FunctionTelemetry:
    """A function's Powertools trio: JSON logs with the Lambda context, EMF metrics, X-Ray traces."""

    logger: Logger
    metrics: Metrics
    tracer: Tracer

    @classmethod
    def for_function(cls, function: str) -> FunctionTelemetry:
        """`function` is the short name (search, preprocess, ...): the logger's and the tracer's service is
        clipsearch-<function>, the metrics' `service` dimension <function>."""
        service = f"clipsearch-{function}"
        tracer = Tracer(service=service) if tracing_enabled() else Tracer(
            service=service, disabled=True, provider=NoTracing()
        )
        return cls(
            logger=Logger(service=service),
            metrics=Metrics(namespace=METRICS_NAMESPACE, service=function),
            tracer=tracer,
        )

    def record_query(self, kind: str, took_ms: float) -> None:
        """The latency of a text or image query, from the request to the answer, in milliseconds."""
        self.metrics.add_metric(name=QUERY_LATENCY_METRICS[kind], unit=MetricUnit.Milliseconds, value=took_ms)

    def record_cache_lookup(self, cache: str, hit: bool) -> None:
        self.metrics.add_metric(name=CACHE_HIT_METRICS[cache], unit=MetricUnit.Count, value=1 if hit else 0)


def tracing_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Powertools' own rule: traced inside Lambda (LAMBDA_TASK_ROOT set) unless POWERTOOLS_TRACE_DISABLED is
    true or SAM's or Chalice's local emulation runs the function."""
    env = os.environ if environ is None else environ
    if env.get("POWERTOOLS_TRACE_DISABLED", "false").lower() in ("1", "y", "yes", "t", "true", "on"):
        return False
    return bool(env.get("LAMBDA_TASK_ROOT")) and not (env.get("AWS_SAM_LOCAL") or env.get("AWS_CHALICE_CLI_MODE"))


class _NoSegment(BaseSegment):
    def close(self, end_time: int | None = None) -> None: ...

    def add_subsegment(self, subsegment) -> None: ...

    def remove_subsegment(self, subsegment) -> None: ...

    def put_annotation(self, key: str, value) -> None: ...

    def put_metadata(self, key: str, value, namespace: str = "default") -> None: ...

    def add_exception(self, exception: BaseException, stack, remote: bool = False) -> None: ...


class NoTracing(BaseProvider):
    """A tracing provider that records nothing and imports nothing: the Tracer's when tracing is off."""

    @contextmanager
    def in_subsegment(self, name=None, **kwargs) -> Iterator[BaseSegment]:
        yield _NoSegment()

    @asynccontextmanager
    async def in_subsegment_async(self, name=None, **kwargs) -> AsyncIterator[BaseSegment]:
        yield _NoSegment()

    def put_annotation(self, key: str, value) -> None: ...

    def put_metadata(self, key: str, value, namespace: str = "default") -> None: ...

    def patch(self, modules) -> None: ...

    def patch_all(self) -> None: ...


def observed_handler(
    telemetry: FunctionTelemetry, correlation_id_path: str | None = None
) -> Callable[[Handler], Handler]:
    """Wraps a Lambda handler: cold-start and application metrics flushed as EMF at the end of every
    invocation (with its request and correlation ids as metadata), a traced handler (responses are not
    recorded: they can carry presigned URLs), log lines with the Lambda context and the correlation id found at `correlation_id_path` in the event, and the
    runtime's loggers routed through the function's Logger for the invocation."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def with_runtime_logs(event: dict, context) -> object:
            # The invocation's EMF line then names its request, so a metric leads back to its logs.
            telemetry.metrics.add_metadata(key="function_request_id", value=context.aws_request_id)
            correlation_id = telemetry.logger.get_correlation_id()
            if correlation_id is not None:
                telemetry.metrics.add_metadata(key="correlation_id", value=correlation_id)
            with runtime_logs_through(telemetry.logger):
                try:
                    return handler(event, context)
                except Exception:
                    telemetry.logger.exception("the invocation failed")  # with its ids, before Lambda's own report
                    raise

        logged = telemetry.logger.inject_lambda_context(
            with_runtime_logs, correlation_id_path=correlation_id_path, clear_state=True
        )
        traced = telemetry.tracer.capture_lambda_handler(logged, capture_response=False)
        return telemetry.metrics.log_metrics(traced, capture_cold_start_metric=True)

    return decorate


_routing_guard = threading.Lock()
_routed_to: list[Logger] = []  # the function Loggers of the invocations running now, oldest first
_own_configuration: tuple[int, list[logging.Handler], bool] | None = None


@contextmanager
def runtime_logs_through(logger: Logger) -> Iterator[None]:
    """Routes the `clipsearch` loggers through `logger` until the block ends. Invocations that overlap in
    one process (never in Lambda; in tests that call handlers from threads) share the routing: the
    latest one's Logger speaks for all, and the original configuration returns after the last ends."""
    global _own_configuration
    runtime = logging.getLogger(RUNTIME_LOGGER)
    with _routing_guard:
        if not _routed_to:
            _own_configuration = (runtime.level, list(runtime.handlers), runtime.propagate)
        _routed_to.append(logger)
        _route(logger)
    try:
        yield
    finally:
        with _routing_guard:
            _routed_to.remove(logger)
            if _routed_to:
                _route(_routed_to[-1])
            elif _own_configuration is not None:
                level, handlers, propagate = _own_configuration
                _set_level(runtime, level)
                runtime.handlers = handlers
                runtime.propagate = propagate


def _route(logger: Logger) -> None:
    """As Powertools' `copy_config_to_registered_loggers(logger, include={"clipsearch"})`: the level and the
    handlers, no propagation (no second, plain copy of each line from the root logger), and the originating
    logger's name added to every line."""
    runtime = logging.getLogger(RUNTIME_LOGGER)
    _set_level(runtime, logger.log_level)
    runtime.handlers = list(logger.handlers)
    runtime.propagate = False
    logger.append_keys(name="%(name)s")


def _set_level(runtime: logging.Logger, level: int) -> None:
    """`runtime.setLevel(level)`, but emptying only the level caches that can change. `Logger.setLevel` empties
    every logger's in the process (~100-200 with boto3 and Powertools loaded), twice per invocation, and each
    logger then works its level out again at its next call (~0.1 ms of a warm search query's CPU, more cache
    misses after the text tower ran). Only `clipsearch` and the loggers under it inherit this logger's level."""
    if runtime.level == level:
        return
    with logging._lock:  # as setLevel: a logger filling its cache meanwhile cannot write back the old level
        runtime.level = level
        registered = logging.root.manager.loggerDict
        for name in _runtime_logger_names(runtime.name):
            each = registered.get(name)
            if isinstance(each, logging.Logger):  # else a placeholder for a logger not created yet
                each._cache.clear()


_runtime_names_seen: tuple[int, list[str]] = (0, [])  # (names in the logging registry, those under clipsearch)


def _runtime_logger_names(runtime: str) -> list[str]:
    """`runtime` and the names under it in the logging registry, looked for again only when a name was added
    (names are never removed, so the count tells; a placeholder becoming a logger keeps its name)."""
    global _runtime_names_seen
    registered = logging.root.manager.loggerDict
    count, names = _runtime_names_seen
    if count != len(registered):
        prefix = f"{runtime}."
        names = [name for name in list(registered) if name == runtime or name.startswith(prefix)]
        _runtime_names_seen = (len(registered), names)
    return names
