"""How many instances of each HTTP API function the local stack runs at once, from the template's reservations."""

from __future__ import annotations

from pathlib import Path

import pytest
from clipsearch_tools.local.stack import api_concurrency
from clipsearch_tools.local.template import load_template

pytestmark = pytest.mark.unit

TEMPLATE = """
Parameters:
  SearchReserved: {Type: Number, Default: RESERVED}
Conditions:
  Reserve: !Not [!Equals [!Ref SearchReserved, "0"]]
Resources:
  Queue: {Type: AWS::SQS::Queue}
  Worker:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/worker/
      Events: {Work: {Type: SQS, Properties: {Queue: !GetAtt Queue.Arn}}}
  Search:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/search/
      ReservedConcurrentExecutions: !If [Reserve, !Ref SearchReserved, !Ref AWS::NoValue]
      Events: {Text: {Type: HttpApi, Properties: {Path: /search, Method: POST}}}
  Datasets:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/datasets/
      ReservedConcurrentExecutions: 3
      Events: {List: {Type: HttpApi, Properties: {Path: /datasets, Method: GET}}}
"""


def _functions(tmp_path: Path, reserved: int):
    (tmp_path / "template.yaml").write_text(TEMPLATE.replace("RESERVED", str(reserved)))
    return load_template(tmp_path / "template.yaml").functions


@pytest.mark.parametrize("reserved, expected", [(20, 20), (1, 1), (0, None)])
def test_reserved_concurrency_follows_the_parameters_default(tmp_path: Path, reserved: int, expected):
    functions = _functions(tmp_path, reserved)
    assert functions["Search"].reserved_concurrency == expected
    assert functions["Datasets"].reserved_concurrency == 3
    assert functions["Worker"].reserved_concurrency is None


def test_api_functions_run_one_instance_per_core_within_their_reservation(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    functions = _functions(tmp_path, 1)
    assert api_concurrency(functions["Search"]) == 1
    assert api_concurrency(functions["Datasets"]) == 3
    assert api_concurrency(_functions(tmp_path, 0)["Search"]) == 4  # unreserved: the cores bound it
    assert api_concurrency(functions["Datasets"], per_function=2) == 2


def test_the_templates_search_function_runs_on_several_local_instances():
    functions = load_template(Path(__file__).resolve().parents[2] / "template.yaml").functions
    assert api_concurrency(functions["SearchFunction"], per_function=2) == 2
