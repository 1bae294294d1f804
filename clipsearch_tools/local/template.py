"""What the local stack reads from template.yaml: functions and their limits, routes, the queue source, schedules.

The template stays the one source of truth: the local gateway serves exactly the HttpApi routes it
declares, each function runs with its MemorySize, Timeout, EphemeralStorage and Environment (Globals
merged with its own), the queue runner uses its batch size, window and maximum concurrency, and the
queue its visibility timeout and redrive policy; another queue's function (dataset deletion) gets a runner too. Short-form intrinsics (!Ref, !Sub, !GetAtt, ...) load as their long form; a `Ref` to
a parameter resolves to the parameter's default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipsearch.errors import ClipsearchError


class TemplateError(ClipsearchError):
    """template.yaml is missing or lacks what the local stack needs."""


class CloudFormationLoader(yaml.SafeLoader):
    """Reads short-form intrinsics as their long form: `!Ref X` -> {"Ref": "X"}, `!GetAtt A.B` -> [A, B]."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


CloudFormationLoader.add_multi_constructor("!", _intrinsic)


# Lambda's defaults when neither the function nor Globals say otherwise.
DEFAULT_TIMEOUT_SECONDS = 3
DEFAULT_MEMORY_MB = 128
DEFAULT_EPHEMERAL_STORAGE_MB = 512


@dataclass(frozen=True)
class EnvironmentVariable:
    """One of a function's Environment.Variables: a literal (or a parameter's default), or a reference."""

    name: str
    value: str | None  # None when the template refers to something only a deployment knows
    reference: str | None = None  # e.g. "Ref ImagesBucket", for the error when nothing local stands in


@dataclass(frozen=True)
class Function:
    logical_id: str
    code_uri: Path  # absolute
    handler: str  # "module.function", e.g. "app.handler"
    timeout: int = DEFAULT_TIMEOUT_SECONDS
    memory_size: int = DEFAULT_MEMORY_MB
    ephemeral_storage: int = DEFAULT_EPHEMERAL_STORAGE_MB
    environment: tuple[EnvironmentVariable, ...] = ()
    reserved_concurrency: int | None = None  # ReservedConcurrentExecutions; None: unreserved


@dataclass(frozen=True)
class Route:
    method: str  # upper case, or "ANY"
    path: str  # as declared: /datasets/{dataset}, /files/{proxy+}
    function: Function

    @property
    def route_key(self) -> str:
        return f"{self.method} {self.path}"

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """The path parameters when this route serves `method path`, else None."""
        if self.method not in ("ANY", method.upper()):
            return None
        found = _path_pattern(self.path).fullmatch(path)
        return None if found is None else found.groupdict()


@dataclass(frozen=True)
class QueueSource:
    function: Function
    batch_size: int
    batching_window_seconds: float
    visibility_timeout: int
    max_receive_count: int | None  # None: no dead-letter queue
    maximum_concurrency: int | None = None  # ScalingConfig.MaximumConcurrency; None: unbounded
    queue_id: str = ""  # the queue's logical id


@dataclass(frozen=True)
class Schedule:
    function: Function
    every_seconds: int


@dataclass(frozen=True)
class NotificationRule:
    """One QueueConfiguration of the bucket: which events and keys reach the queue."""

    event: str  # s3:ObjectCreated:* or s3:ObjectRemoved:*
    prefix: str
    suffix: str

    def matches(self, event_name: str, key: str) -> bool:
        family = self.event.removeprefix("s3:").removesuffix("*")
        return event_name.startswith(family) and key.startswith(self.prefix) and key.endswith(self.suffix)


@dataclass(frozen=True)
class Template:
    routes: tuple[Route, ...]
    queue_source: QueueSource  # the queue the bucket notifies (ingestion)
    schedules: tuple[Schedule, ...]
    notifications: tuple[NotificationRule, ...]
    functions: dict[str, Function]
    task_queue_sources: tuple[QueueSource, ...] = ()  # the other queues' functions (dataset deletion)

    def function_for(self, code_dir_name: str) -> Function:
        """The function whose CodeUri is functions/<code_dir_name>/."""
        for function in self.functions.values():
            if function.code_uri.name == code_dir_name:
                return function
        raise TemplateError(f"template.yaml has no function with CodeUri functions/{code_dir_name}/")


def load_template(path: Path) -> Template:
    path = Path(path).resolve()
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=CloudFormationLoader)
    except OSError as error:
        raise TemplateError(f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise TemplateError(f"{path} is not valid YAML: {error}") from None
    resources = document.get("Resources") or {}
    resolve = _Resolver(document)
    global_function = (document.get("Globals") or {}).get("Function") or {}
    functions: dict[str, Function] = {}
    routes: list[Route] = []
    queue_sources: list[QueueSource] = []
    schedules: list[Schedule] = []
    for logical_id, resource in resources.items():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        properties = resource.get("Properties") or {}

        def setting(name: str, default):
            return resolve(properties.get(name, global_function.get(name, default)))

        storage = properties.get("EphemeralStorage", global_function.get("EphemeralStorage")) or {}
        function = Function(
            logical_id=logical_id,
            code_uri=(path.parent / properties["CodeUri"]).resolve(),
            handler=setting("Handler", "app.handler"),
            timeout=int(setting("Timeout", DEFAULT_TIMEOUT_SECONDS)),
            memory_size=int(setting("MemorySize", DEFAULT_MEMORY_MB)),
            ephemeral_storage=int(resolve(storage.get("Size", DEFAULT_EPHEMERAL_STORAGE_MB))),
            environment=_environment(global_function, properties, resolve),
            reserved_concurrency=_reserved_concurrency(properties.get("ReservedConcurrentExecutions"), resolve),
        )
        functions[logical_id] = function
        for event in (properties.get("Events") or {}).values():
            kind, event_properties = event.get("Type"), event.get("Properties") or {}
            if kind == "HttpApi":
                routes.append(
                    Route(str(event_properties["Method"]).upper(), event_properties["Path"], function)
                )
            elif kind == "SQS":
                queue_sources.append(_queue_source(function, event_properties, resources, resolve))
            elif kind in ("Schedule", "ScheduleV2"):
                expression = resolve(event_properties.get("Schedule") or event_properties.get("ScheduleExpression"))
                every = _rate_seconds(str(expression))
                if every is not None:
                    schedules.append(Schedule(function, every))
    notified = _notified_queues(resources)
    ingest_sources = [source for source in queue_sources if source.queue_id in notified] or queue_sources
    if len(ingest_sources) != 1:
        raise TemplateError(
            f"{path}: expected one function with an SQS event from the bucket's queue, found {len(ingest_sources)}"
        )
    if not routes:
        raise TemplateError(f"{path}: no function has an HttpApi event")
    return Template(
        routes=tuple(_most_specific_first(routes)),
        queue_source=ingest_sources[0],
        schedules=tuple(schedules),
        notifications=tuple(_notification_rules(resources)),
        functions=functions,
        task_queue_sources=tuple(source for source in queue_sources if source is not ingest_sources[0]),
    )


def _notified_queues(resources: dict) -> set[str]:
    """Logical ids of the queues a bucket sends its notifications to."""
    return {
        _referenced_resource(queue.get("Queue"))
        for resource in resources.values() if resource.get("Type") == "AWS::S3::Bucket"
        for queue in (((resource.get("Properties") or {}).get("NotificationConfiguration") or {})
                      .get("QueueConfigurations") or [])
    }


def _reserved_concurrency(value, resolve) -> int | None:
    """A number, a parameter, or `!If [reserve, !Ref Parameter, !Ref AWS::NoValue]` as the parameter's default decides."""
    branches = value["Fn::If"][1:] if isinstance(value, dict) and "Fn::If" in value else [value]
    for branch in branches:
        if branch is None or branch == {"Ref": "AWS::NoValue"}:
            continue
        reserved = int(resolve(branch))
        if reserved > 0:  # 0 is how the template's parameters say "unreserved"
            return reserved
    return None


def _queue_source(function: Function, properties: dict, resources: dict, resolve) -> QueueSource:
    queue_id = _referenced_resource(properties.get("Queue"))
    queue = (resources.get(queue_id) or {}).get("Properties") or {}
    redrive = queue.get("RedrivePolicy") or {}
    concurrency = (properties.get("ScalingConfig") or {}).get("MaximumConcurrency")
    return QueueSource(
        function=function,
        batch_size=int(resolve(properties.get("BatchSize", 10))),
        batching_window_seconds=float(resolve(properties.get("MaximumBatchingWindowInSeconds", 0))),
        visibility_timeout=int(resolve(queue.get("VisibilityTimeout", 30))),
        max_receive_count=int(resolve(redrive["maxReceiveCount"])) if redrive else None,
        maximum_concurrency=int(resolve(concurrency)) if concurrency is not None else None,
        queue_id=queue_id or "",
    )


def _environment(global_function: dict, properties: dict, resolve) -> tuple[EnvironmentVariable, ...]:
    """Globals' variables overridden by the function's own, as SAM merges them."""
    merged = {
        **((global_function.get("Environment") or {}).get("Variables") or {}),
        **((properties.get("Environment") or {}).get("Variables") or {}),
    }
    variables = []
    for name, raw in merged.items():
        value = resolve.value_or_none(raw)
        reference = None if value is not None else " ".join(str(part) for part in next(iter(raw.items())))
        variables.append(EnvironmentVariable(name, value, reference))
    return tuple(variables)


def _notification_rules(resources: dict) -> list[NotificationRule]:
    rules = []
    for resource in resources.values():
        if resource.get("Type") != "AWS::S3::Bucket":
            continue
        configuration = (resource.get("Properties") or {}).get("NotificationConfiguration") or {}
        for queue in configuration.get("QueueConfigurations") or []:
            filters = {
                rule["Name"].lower(): rule["Value"]
                for rule in ((queue.get("Filter") or {}).get("S3Key") or {}).get("Rules") or []
            }
            rules.append(NotificationRule(queue["Event"], filters.get("prefix", ""), filters.get("suffix", "")))
    return rules


def _referenced_resource(value) -> str | None:
    if isinstance(value, dict):
        if "Ref" in value:
            return value["Ref"]
        if "Fn::GetAtt" in value:
            return value["Fn::GetAtt"][0]
    return None


class _Resolver:
    """Literal values, with `Ref`s to parameters replaced by their defaults."""

    def __init__(self, document: dict) -> None:
        self._parameters = document.get("Parameters") or {}

    def __call__(self, value):
        if isinstance(value, dict) and set(value) == {"Ref"}:
            parameter = self._parameters.get(value["Ref"])
            if parameter is None or "Default" not in parameter:
                raise TemplateError(f"cannot resolve Ref {value['Ref']!r} locally: no parameter default")
            return parameter["Default"]
        return value

    def value_or_none(self, value) -> str | None:
        """A literal or a parameter's default as a string; None for what only a deployment resolves."""
        if isinstance(value, dict):
            if set(value) == {"Ref"} and "Default" in (self._parameters.get(value["Ref"]) or {}):
                return str(self._parameters[value["Ref"]]["Default"])
            return None
        return "" if value is None else str(value)


_RATE = re.compile(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)")
_UNIT_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


def _rate_seconds(expression: str) -> int | None:
    """Seconds between runs of a `rate(...)` expression; None for cron expressions (not run locally)."""
    found = _RATE.fullmatch(expression.strip())
    if found is None:
        return None
    return int(found.group(1)) * _UNIT_SECONDS[found.group(2).rstrip("s")]


def _path_pattern(path: str) -> re.Pattern:
    parts = []
    for segment in re.split(r"(\{[^}]+\})", path):
        if segment.startswith("{") and segment.endswith("+}"):
            parts.append(f"(?P<{segment[1:-2]}>.+)")
        elif segment.startswith("{"):
            parts.append(f"(?P<{segment[1:-1]}>[^/]+)")
        else:
            parts.append(re.escape(segment))
    return re.compile("".join(parts))


def _most_specific_first(routes: list[Route]) -> list[Route]:
    # API Gateway prefers literal segments over parameters, and parameters over greedy ones.
    def specificity(route: Route) -> tuple:
        segments = route.path.strip("/").split("/")
        return (
            sum(not segment.startswith("{") for segment in segments),
            -sum(segment.endswith("+}") for segment in segments),
            len(segments),
            route.method != "ANY",
        )

    return sorted(routes, key=specificity, reverse=True)
