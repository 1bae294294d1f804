"""The local stack's supervisor: starts every part, runs the functions in child processes, stops it all on SIGTERM.

Run as `python -m clipsearch_tools.local.stack --home DIR --model-dir DIR` in the background (by
`clipsearch local up`); its progress and the functions' logs go to stdout (the stack log), and the
state file in the home says where each part listens. The functions run under the template's limits
(local/functions.py), with the environment local/function_environment.py builds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from clipsearch.aws import aws_client
from clipsearch_tools.local.function_environment import FunctionEnvironment
from clipsearch_tools.local.functions import FunctionHost
from clipsearch_tools.local.gateway import LocalGateway
from clipsearch_tools.local.lambda_api import LocalLambdaApi
from clipsearch_tools.local.models import publish_model, read_model
from clipsearch_tools.local.ports import free_port
from clipsearch_tools.local.postgres import PostgresCluster, find_bin_dir
from clipsearch_tools.local.queue_runner import QueueRunner
from clipsearch_tools.local.seaweed import FilerEventFeed, SeaweedServer, sqs_batch_sender
from clipsearch_tools.local.state import StackState
from clipsearch_tools.local.template import Function, Template, load_template

logger = logging.getLogger(__name__)

QUEUE_NAME = "clipsearch-ingest"
DEAD_LETTER_QUEUE_NAME = "clipsearch-ingest-dlq"
PREPROCESS_CONCURRENCY_ENV = "CLIPSEARCH_LOCAL_PREPROCESS_CONCURRENCY"
ONNX_THREADS_ENV = "CLIPSEARCH_LOCAL_ONNX_THREADS"
ONNX_THREADS_VARIABLE = "CLIPSEARCH_ONNX_THREADS"
API_CONCURRENCY_ENV = "CLIPSEARCH_LOCAL_API_CONCURRENCY"


def default_preprocess_concurrency() -> int:
    """Preprocessing instances at once: one per core."""
    return max(1, os.cpu_count() or 1)


def api_concurrency(function: Function, per_function: int | None = None) -> int:
    """Instances of an HTTP API function at once: one per core (or `per_function`), within its reserved concurrency."""
    wanted = per_function or max(1, os.cpu_count() or 1)
    return max(1, min(wanted, function.reserved_concurrency or wanted))


def default_onnx_threads(concurrency: int) -> int:
    """ONNX intra-op threads per preprocessing instance, so that all instances together fill the cores once."""
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


def scheduled_event(function: Function) -> dict:
    """The EventBridge event a `Schedule` source delivers."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": "us-east-1",
        "resources": [f"arn:aws:events:us-east-1:000000000000:rule/{function.logical_id}"],
        "detail": {},
    }


class Scheduler:
    """Invokes each scheduled function every `rate(...)` of the template, first after one period."""

    def __init__(self, template: Template, invoke: Callable[[Function, dict], object]) -> None:
        self._template = template
        self._invoke = invoke
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        due = {schedule: time.monotonic() + schedule.every_seconds for schedule in self._template.schedules}
        while not self._stop.wait(1):
            for schedule, at in due.items():
                if time.monotonic() < at:
                    continue
                due[schedule] = time.monotonic() + schedule.every_seconds
                try:
                    self._invoke(schedule.function, scheduled_event(schedule.function))
                except Exception:
                    logger.exception("scheduled %s failed", schedule.function.logical_id)


class LocalStack:
    """Every part of the stack, started in dependency order and stopped in reverse."""

    def __init__(self, home: Path, model_dir: Path, template_path: Path, database_url: str | None,
                 preprocess_concurrency: int | None = None, onnx_threads: int | None = None,
                 api_instances: int | None = None) -> None:
        self.home = home
        self.template = load_template(template_path)
        self.model = read_model(model_dir)
        self.state = StackState(
            status="starting", home=str(home), pid=os.getpid(), log_file=str(home / "logs" / "stack.log"),
            template=str(template_path), model_id=self.model.model_id,
            model_random_weights=self.model.random_weights, model_dir=str(model_dir), started_at=time.time(),
        )
        self._explicit_database_url = database_url
        self._stops: list[Callable[[], None]] = []
        source = self.template.queue_source
        self.preprocess_concurrency = min(
            preprocess_concurrency or default_preprocess_concurrency(), source.maximum_concurrency or sys.maxsize
        )
        self.onnx_threads = default_onnx_threads(self.preprocess_concurrency) if onnx_threads is None else onnx_threads
        preprocess = source.function.logical_id
        self.api_concurrency = {route.function.logical_id: api_concurrency(route.function, api_instances)
                                for route in self.template.routes}
        self.task_concurrency = {task.function.logical_id: task.maximum_concurrency or 1
                                 for task in self.template.task_queue_sources}
        self.functions = FunctionHost(
            FunctionEnvironment(self.state, {preprocess: {ONNX_THREADS_VARIABLE: str(self.onnx_threads)}}),
            runtime_dir=home / "functions",
            concurrency={**self.api_concurrency, **self.task_concurrency, preprocess: self.preprocess_concurrency},
        )

    def start(self) -> None:
        self.state.write()
        shutil.rmtree(self.home / "functions", ignore_errors=True)  # instances of a supervisor that was killed
        self._stops.append(self.functions.stop)
        self._start_postgres()
        self._start_object_storage()
        self._start_queue()
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        publish_model(self._object_store(), self.model)
        self._start_event_feed()
        self._start_lambda_api()
        self._start_queue_runner()
        self._start_gateway()
        self._reconcile()
        scheduler = Scheduler(self.template, self.functions.invoke)
        scheduler.start()
        self._stops.append(scheduler.stop)
        self.state.status = "ready"
        self.state.write()
        logger.info("local stack ready: API %s, S3 %s; preprocessing: %d instances at once, %d ONNX threads each; "
                    "API functions' instances: %s", self.state.api_url, self.state.s3_endpoint_url,
                    self.preprocess_concurrency, self.onnx_threads, self.api_concurrency)

    def stop(self) -> None:
        self.state.status = "stopping"
        self.state.write()
        for stop in reversed(self._stops):
            try:
                stop()
            except Exception:
                logger.exception("stopping a part failed")
        self._stops.clear()

    def _start_postgres(self) -> None:
        from clipsearch.adapters.postgres_catalog import migrate
        from clipsearch.adapters.postgres_connection import Database

        if self._explicit_database_url:
            self.state.database_url = self._explicit_database_url
        else:
            cluster = PostgresCluster(self.home / "postgres" / "data", free_port(), find_bin_dir())
            if cluster.data_dir.exists() and cluster.is_running():  # left over by a supervisor that was killed
                cluster.stop()
            cluster.start()
            self._stops.append(cluster.stop)
            self.state.database_url = cluster.url
            self.state.postgres_data_dir = str(cluster.data_dir)
        database = Database(self.state.database_url)
        try:
            migrate(database)
        finally:
            database.close()
        self.state.write()

    def _start_object_storage(self) -> None:
        server = SeaweedServer(
            data_dir=self.home / "objects", log_file=self.home / "logs" / "seaweedfs.log",
            access_key=self.state.access_key_id, secret_key=self.state.secret_access_key,
        )
        self._stops.append(server.stop)
        server.start(lambda url: self._client("s3", url), on_launched=self._record_object_storage)
        self._seaweed = server
        self.state.s3_endpoint_url = server.s3_url
        s3 = self._client("s3", server.s3_url)
        if self.state.bucket not in {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=self.state.bucket)
        self.state.write()

    def _record_object_storage(self, pid: int) -> None:
        """Written at once: a supervisor killed from here on leaves a record `local up` finds the server by."""
        self.state.parts["object_storage"] = pid
        self.state.write()

    def _start_queue(self) -> None:
        from clipsearch_tools.local.sqs import start_sqs_server

        server = start_sqs_server()
        self._stops.append(server.stop)
        host, port = server.get_host_and_port()
        self.state.sqs_endpoint_url = f"http://{host}:{port}"
        sqs = self._client("sqs", self.state.sqs_endpoint_url)
        source = self.template.queue_source
        attributes = {"VisibilityTimeout": str(source.visibility_timeout)}
        if source.max_receive_count is not None:
            dead_letters = sqs.create_queue(QueueName=DEAD_LETTER_QUEUE_NAME)["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=dead_letters, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            attributes["RedrivePolicy"] = (
                f'{{"deadLetterTargetArn": "{arn}", "maxReceiveCount": "{source.max_receive_count}"}}'
            )
            self.state.dead_letter_queue_url = dead_letters
        self.state.queue_url = sqs.create_queue(QueueName=QUEUE_NAME, Attributes=attributes)["QueueUrl"]
        for task in self.template.task_queue_sources:
            self.state.task_queues[task.queue_id] = self._create_queue(sqs, f"clipsearch-{task.queue_id}", task)
        self.state.write()

    @staticmethod
    def _create_queue(sqs, name: str, source) -> str:
        """A queue with the template's visibility timeout and, when it has one, its dead-letter queue."""
        attributes = {"VisibilityTimeout": str(source.visibility_timeout)}
        if source.max_receive_count is not None:
            dead_letters = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=dead_letters, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(source.max_receive_count)}
            )
        return sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]

    def _start_event_feed(self) -> None:
        sqs = self._client("sqs", self.state.sqs_endpoint_url)
        feed = FilerEventFeed(
            self._seaweed, self.state.bucket, self.template.notifications,
            lambda body: sqs.send_message(QueueUrl=self.state.queue_url, MessageBody=body),
            self.home / "logs" / "seaweedfs.log",
            send_batch=sqs_batch_sender(sqs, self.state.queue_url),
        )
        feed.start()
        self._stops.append(feed.stop)

    def _start_queue_runner(self) -> None:
        sqs = self._client("sqs", self.state.sqs_endpoint_url)
        arn = sqs.get_queue_attributes(QueueUrl=self.state.queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        source = self.template.queue_source
        runner = QueueRunner(
            sqs, self.state.queue_url, arn, lambda event: self.functions.invoke(source.function, event),
            source.batch_size, source.batching_window_seconds, self.preprocess_concurrency,
        )
        runner.start()
        self._stops.append(runner.stop)
        for task in self.template.task_queue_sources:
            url = self.state.task_queues[task.queue_id]
            arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            runner = QueueRunner(
                sqs, url, arn, lambda event, function=task.function: self.functions.invoke(function, event),
                task.batch_size, task.batching_window_seconds, self.task_concurrency[task.function.logical_id],
            )
            runner.start()
            self._stops.append(runner.stop)

    def _start_lambda_api(self) -> None:
        """Before any function starts: their environments carry its URL (the search function's shard searchers)."""
        api = LocalLambdaApi(self.template.functions, self.functions.invoke)
        self.state.lambda_endpoint_url = api.start()
        self._stops.append(api.stop)
        self.state.write()

    def _start_gateway(self) -> None:
        gateway = LocalGateway(self.template.routes, self.functions.invoke, concurrency=self.api_concurrency)
        gateway.start()
        self._stops.append(gateway.stop)
        self.state.api_url = gateway.url
        self.state.write()

    def _reconcile(self) -> None:
        """Announces what the catalog lacks: uploads the queue never delivered before the last stop."""
        function = self.template.function_for("reconcile")
        report = self.functions.invoke(function, scheduled_event(function))
        logger.info("reconciliation on start: %s", report)

    def _object_store(self):
        from clipsearch.adapters.s3_store import S3ObjectStore

        return S3ObjectStore(self._client("s3", self.state.s3_endpoint_url), self.state.bucket)

    def _client(self, service: str, endpoint_url: str):
        # Few retries: parts that are starting are polled, and a wait should end soon after they answer.
        return aws_client(service, self.state.region, endpoint_url, self.state.access_key_id,
                          self.state.secret_access_key, max_attempts=3)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipsearch_tools.local.stack")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--preprocess-concurrency", type=int, default=_env_int(PREPROCESS_CONCURRENCY_ENV))
    parser.add_argument("--onnx-threads", type=int, default=_env_int(ONNX_THREADS_ENV))
    parser.add_argument("--api-instances", type=int, default=_env_int(API_CONCURRENCY_ENV))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every SQS call
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    home = args.home.resolve()
    stack = None
    try:
        stack = LocalStack(home, args.model_dir.resolve(), args.template.resolve(),
                           os.environ.get("CLIPSEARCH_DATABASE_URL") or None,
                           args.preprocess_concurrency, args.onnx_threads, args.api_instances)
        stack.start()
    except Exception as error:
        logger.exception("the local stack failed to start")
        state = stack.state if stack else StackState(status="failed", home=str(home), pid=os.getpid(),
                                                     log_file=str(home / "logs" / "stack.log"))
        if stack:
            stack.stop()
        state.status, state.error = "failed", f"{type(error).__name__}: {error}"
        state.write()
        return 1
    while not stopping.wait(1):
        pass
    logger.info("stopping the local stack")
    stack.stop()
    stack.state.status = "stopped"
    stack.state.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
