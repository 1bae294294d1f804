"""`clipsearch local up|down|status|env`: the local stack's lifecycle, and how other tools reach its bucket."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from clipsearch_tools.cli.output import emit_json, note, random_weights_note, table
from clipsearch_tools.local.control import (
    DEFAULT_TEMPLATE,
    LocalStackError,
    probe_parts,
    running_state,
    start_stack,
    stop_stack,
)
from clipsearch_tools.local.models import ensure_default_model, read_model
from clipsearch_tools.local.state import StackState, stack_home


def up(args: argparse.Namespace) -> int:
    home = stack_home(args.home)
    home.mkdir(parents=True, exist_ok=True)
    template = Path(args.template or DEFAULT_TEMPLATE).resolve()
    if not template.is_file():
        raise LocalStackError(f"template not found: {template} (give --template)")
    existing = running_state(home)
    if existing is None:
        model = read_model(Path(args.model_dir)) if args.model_dir else ensure_default_model(home / "models", sys.stderr)
        if model.random_weights:
            note(random_weights_note(model.model_id))
        started = time.monotonic()
        state = start_stack(home, model.directory, template, args.timeout,
                            args.preprocess_concurrency, args.onnx_threads)
        elapsed = time.monotonic() - started
    else:
        state, elapsed = existing, None
    if args.json:
        emit_json(_summary(state) | {"started_in_seconds": None if elapsed is None else round(elapsed, 1)})
        return 0
    print(f"local stack {'ready' if elapsed is not None else 'already running'} in {home}"
          + (f" ({elapsed:.1f} s)" if elapsed is not None else ""))
    _print_endpoints(state)
    return 0


def down(args: argparse.Namespace) -> int:
    home = stack_home(args.home)
    stopped = stop_stack(home, args.timeout)
    if args.json:
        emit_json({"home": str(home), "stopped": stopped})
    else:
        print(f"local stack in {home} stopped" if stopped else f"no local stack was running in {home}")
    return 0


def status(args: argparse.Namespace) -> int:
    home = stack_home(args.home)
    state = running_state(home)
    if state is None or state.status != "ready":
        recorded = StackState.read(home)
        detail = f" (last state: {recorded.status}{': ' + recorded.error if recorded and recorded.error else ''})" \
            if recorded else ""
        if args.json:
            emit_json({"home": str(home), "running": False, "status": recorded.status if recorded else None,
                       "error": recorded.error if recorded else None, "api_url": None})
        else:
            print(f"no local stack running in {home}{detail}")
        return 1
    parts = probe_parts(state)
    healthy = all(part["ok"] for part in parts.values())
    if args.json:
        emit_json(_summary(state) | {"running": True, "healthy": healthy, "parts": parts})
    else:
        print(f"local stack in {home}: {'healthy' if healthy else 'DEGRADED'}")
        table(["part", "state", "detail"], [[name, "ok" if part["ok"] else "FAIL", part["detail"]]
                                            for name, part in parts.items()])
        print(f"log: {state.log_file}")
    return 0 if healthy else 1


def bucket_environment(state: StackState) -> dict[str, str]:
    """The variables with which the AWS CLI, rclone (env_auth) or boto3 reach the local bucket."""
    return {
        "AWS_ENDPOINT_URL_S3": state.s3_endpoint_url or "",
        "AWS_ACCESS_KEY_ID": state.access_key_id,
        "AWS_SECRET_ACCESS_KEY": state.secret_access_key,
        "AWS_DEFAULT_REGION": state.region,
        "CLIPSEARCH_BUCKET": state.bucket,
    }


def env(args: argparse.Namespace) -> int:
    home = stack_home(args.home)
    state = running_state(home)
    if state is None or state.status != "ready":
        raise LocalStackError(f"no local stack is running in {home} (start it with `clipsearch local up`)")
    variables = bucket_environment(state)
    if args.json:
        emit_json(variables)
    else:
        print("export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in variables.items()))
    return 0


def _summary(state: StackState) -> dict:
    return {
        "home": state.home, "status": state.status, "api_url": state.api_url, "bucket": state.bucket,
        "s3_endpoint_url": state.s3_endpoint_url, "sqs_endpoint_url": state.sqs_endpoint_url,
        "queue_url": state.queue_url, "dead_letter_queue_url": state.dead_letter_queue_url,
        "database_url": state.database_url, "model_id": state.model_id,
        "model_random_weights": state.model_random_weights, "log_file": state.log_file, "pid": state.pid,
    }


def _print_endpoints(state: StackState) -> None:
    table(["part", "endpoint"], [
        ["api", state.api_url],
        ["object storage (S3)", f"{state.s3_endpoint_url}  bucket {state.bucket}"],
        ["queue (SQS)", state.queue_url],
        ["postgres", state.database_url],
        ["model", state.model_id + (" (RANDOM weights)" if state.model_random_weights else "")],
        ["log", state.log_file],
    ])
