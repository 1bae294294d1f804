"""Writes a copy of a built SAM template that lets `sam local` point the functions at local services.

`sam local invoke --env-vars` only sets variables the template declares, and the deployed template
rightly declares no local endpoints. The copy (written beside the built template, so its relative
CodeUri paths still resolve) declares them empty in Globals; `--env-vars` then gives their values.
Nothing else changes: runtime, handler, memory, timeout and layers are the deployed ones.

Usage: python scripts/sam_local/local_template.py BUILT_TEMPLATE  (prints the copy's path)
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

LOCAL_VARIABLES = (
    "CLIPSEARCH_DATABASE_URL",
    "CLIPSEARCH_S3_ENDPOINT_URL",
    "CLIPSEARCH_SQS_ENDPOINT_URL",
    "CLIPSEARCH_QUEUE_URL",
)


def declare_local_variables(template: dict) -> dict:
    variables = (
        template.setdefault("Globals", {}).setdefault("Function", {})
        .setdefault("Environment", {}).setdefault("Variables", {})
    )
    for name in LOCAL_VARIABLES:
        variables.setdefault(name, "")
    return template


def write_local_template(built_template: Path) -> Path:
    template = yaml.safe_load(built_template.read_text(encoding="utf-8"))
    local = built_template.with_name("template.local.yaml")
    local.write_text(yaml.safe_dump(declare_local_variables(template), sort_keys=False), encoding="utf-8")
    return local


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.splitlines()[-1])
    print(write_local_template(Path(sys.argv[1])))
