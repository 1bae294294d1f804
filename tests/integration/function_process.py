"""One function's handler in a fresh process, as one Lambda execution environment: events in, answers out.

    python function_process.py FUNCTION EVENTS_JSON ANSWERS_JSON

Invokes functions/FUNCTION/app.py's handler with each event of EVENTS_JSON (a list) in turn, the n-th
with the request id `request-<n>`, and writes {"answers": [...], "tracing_enabled": bool} to
ANSWERS_JSON. stdout belongs to the function (its log lines and EMF metrics), as it does in Lambda.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"


@dataclass
class LambdaContext:
    function_name: str
    aws_request_id: str
    memory_limit_in_mb: int = 1024

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:123456789012:function:{self.function_name}"


def main(function: str, events_path: str, answers_path: str) -> None:
    spec = importlib.util.spec_from_file_location("app", FUNCTIONS / function / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    events = json.loads(Path(events_path).read_text())
    answers = [
        app.handler(event, LambdaContext(f"clipsearch-{function}", f"request-{number}"))
        for number, event in enumerate(events)
    ]
    tracing_enabled = not app.telemetry.tracer.disabled
    Path(answers_path).write_text(json.dumps({"answers": answers, "tracing_enabled": tracing_enabled}))


if __name__ == "__main__":
    main(*sys.argv[1:])
