"""`clipsearch sync`'s reconciliation, `clipsearch migrate` and `clipsearch export-model`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from clipsearch.errors import ClipsearchError
from clipsearch_tools.cli.output import emit_json, note, random_weights_note
from clipsearch_tools.client import ClipsearchClient, StackUnreachable
from clipsearch_tools.local.control import running_state
from clipsearch_tools.local.state import stack_home

RECONCILE_FUNCTION_ENV = "CLIPSEARCH_RECONCILE_FUNCTION"


def reconcile(client: ClipsearchClient, dataset: str) -> dict:
    """Runs the reconciliation function for one dataset: in this process for the local stack, else in AWS."""
    event = {"dataset": dataset}
    state = client.target.local
    if state is not None:
        from clipsearch_tools.local.functions import FunctionHost
        from clipsearch_tools.local.template import load_template

        os.environ.update(state.handler_environment())
        # The function logs and emits metrics on stdout, which belongs to this command's output.
        os.environ.update({"POWERTOOLS_LOG_LEVEL": "WARNING", "POWERTOOLS_METRICS_DISABLED": "true"})
        function = load_template(Path(state.template)).function_for("reconcile")
        with contextlib.redirect_stdout(sys.stderr):
            response = FunctionHost().invoke(function, event)
    else:
        name = os.environ.get(RECONCILE_FUNCTION_ENV)
        if not name:
            raise StackUnreachable(f"set {RECONCILE_FUNCTION_ENV} to the deployed ReconcileFunction's name")
        from clipsearch.aws import aws_client

        answer = aws_client("lambda", client.target.region).invoke(
            FunctionName=name, Payload=json.dumps(event).encode()
        )
        response = json.loads(answer["Payload"].read())
        if answer.get("FunctionError"):
            raise ClipsearchError(f"reconciliation failed: {response.get('errorMessage', response)}")
    return response["datasets"][0]


def migrate(args: argparse.Namespace) -> int:
    """The database named by --database-url, else CLIPSEARCH_DATABASE_URL or CLIPSEARCH_DB_SECRET_ARN (read
    as the functions read it), else the running local stack's."""
    from clipsearch.adapters.postgres_catalog import migrate as apply_migrations
    from clipsearch.config import Settings
    from clipsearch.wiring import build_database

    environment = dict(os.environ)
    if args.database_url:
        environment["CLIPSEARCH_DATABASE_URL"] = args.database_url
    if not (environment.get("CLIPSEARCH_DATABASE_URL") or environment.get("CLIPSEARCH_DB_SECRET_ARN")):
        state = running_state(stack_home(args.home))
        if state is None or not state.database_url:
            raise ClipsearchError("no database: give --database-url, set CLIPSEARCH_DATABASE_URL or "
                                  "CLIPSEARCH_DB_SECRET_ARN, or start the local stack")
        environment["CLIPSEARCH_DATABASE_URL"] = state.database_url
    database = build_database(Settings.catalog_from_env(environment))
    try:
        applied = apply_migrations(database)
    finally:
        database.close()
    if args.json:
        emit_json({"applied": applied})
    else:
        print(f"applied {len(applied)} migrations: {', '.join(applied)}" if applied else "catalog schema up to date")
    return 0


def export_model(args: argparse.Namespace, client_factory) -> int:
    from clipsearch_tools.local.models import publish_model, read_model, run_exporter

    arguments = ["--random-arch", args.random_arch, "--seed", str(args.seed)] if args.random_arch \
        else ["--model", args.model]
    arguments += ["--quantize", args.quantize] + (["--force"] if args.force else [])
    run_exporter(arguments, Path(args.out), sys.stderr)
    model = read_model(Path(args.out))
    uploaded = None
    if args.publish:
        uploaded = publish_model(client_factory().object_store(), model)
    if model.random_weights:
        note(random_weights_note(model.model_id))
    if args.json:
        emit_json({"model_id": model.model_id, "directory": str(model.directory), "random_weights": model.random_weights,
                   "published_files": uploaded})
    else:
        print(f"model {model.model_id} exported to {model.directory}"
              + (f"; published to models/{model.model_id}/ ({uploaded} files uploaded)" if args.publish else ""))
    return 0
