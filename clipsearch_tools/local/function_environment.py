"""The environment of a local function instance: its template variables, with local stand-ins for AWS's parts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from clipsearch_tools.local.state import StackState
from clipsearch_tools.local.template import Function, TemplateError

# A template variable that names an AWS-only resource, and the local variable that replaces it.
SECRET_STAND_INS = {"CLIPSEARCH_DB_SECRET_ARN": "CLIPSEARCH_DATABASE_URL"}
# Variables that name another function of the template (a `Ref` to it): the local Lambda API serves it.
FUNCTION_REFERENCES = {"CLIPSEARCH_SHARD_FUNCTION"}


class FunctionEnvironment:
    """Builds each function's variables as the template gives them, pointed at this stack.

    - A variable the template gives with a value the stack knows better (the bucket, the model, the
      queue URL: CloudFormation resolves them on deploy) takes the stack's value.
    - The database secret's ARN is replaced by the local database's URL; a `Ref` to another queue of the
      template (the deletion queue) by that queue's local URL.
    - Literals and parameter defaults are kept; a reference with no local value is an error.
    - Every function gets the local S3/SQS/Lambda endpoints and the stack's keys (in AWS: the default
      endpoints and the role's credentials), and its model cache in its own /tmp; a reference to another
      function (the shard search function) is its logical id, which the local Lambda API serves.
    - `overrides` (function -> variables) are local settings applied last, such as the ONNX thread
      count of the preprocessing instances when several share this machine's cores.
    Nothing else of the stack's own environment reaches a function.
    """

    def __init__(self, state: StackState, overrides: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self._state = state
        self._overrides = {name: dict(values) for name, values in (overrides or {}).items()}

    def __call__(self, function: Function, tmp_dir: Path) -> dict[str, str]:
        state = self._state
        known = {
            "CLIPSEARCH_BUCKET": state.bucket,
            "CLIPSEARCH_MODEL_ID": state.model_id,
            "CLIPSEARCH_QUEUE_URL": state.queue_url,
        }
        stand_ins = {"CLIPSEARCH_DATABASE_URL": state.database_url}
        variables: dict[str, str] = {}
        for variable in function.environment:
            if variable.name in SECRET_STAND_INS:
                local_name = SECRET_STAND_INS[variable.name]
                variables[local_name] = stand_ins[local_name] or ""
            elif variable.name in FUNCTION_REFERENCES:
                # Another function, invoked by logical id through the stack's Lambda API; without that API,
                # none (the search function then loads every dataset whole, and never calls AWS).
                target = (variable.reference or "").removeprefix("Ref ")
                variables[variable.name] = target if state.lambda_endpoint_url else ""
            elif known.get(variable.name):
                variables[variable.name] = known[variable.name]
            elif (variable.reference or "").removeprefix("Ref ") in state.task_queues:
                variables[variable.name] = state.task_queues[variable.reference.removeprefix("Ref ")]
            elif variable.value is not None:
                variables[variable.name] = variable.value
            else:
                raise TemplateError(
                    f"{function.logical_id}: environment variable {variable.name} ({variable.reference}) "
                    "has no local value"
                )
        variables |= {
            "CLIPSEARCH_S3_ENDPOINT_URL": state.s3_endpoint_url or "",
            "CLIPSEARCH_SQS_ENDPOINT_URL": state.sqs_endpoint_url or "",
            "CLIPSEARCH_LAMBDA_ENDPOINT_URL": state.lambda_endpoint_url or "",
            "AWS_ACCESS_KEY_ID": state.access_key_id,
            "AWS_SECRET_ACCESS_KEY": state.secret_access_key,
            "AWS_REGION": state.region,
            "AWS_DEFAULT_REGION": state.region,
            # Settings' default is /tmp/clipsearch/models: the same place inside this instance's /tmp.
            "CLIPSEARCH_MODEL_CACHE_DIR": str(tmp_dir / "clipsearch" / "models"),
        }
        return variables | self._overrides.get(function.logical_id, {})
