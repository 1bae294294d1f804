"""Each function's IAM role and environment as SAM deploys them: template.yaml through SAM's own translator.

Offline: SAM's translator (aws-sam-translator) is given the managed-policy ARNs it would look up in
IAM, and stands in for CloudFormation only as far as the policies and environments need:
- AWS::LanguageExtensions is applied to the one thing it does here, `Fn::If` on parameter-only
  conditions (the template's conditions compare parameters with literals);
- the local CodeUri / ContentUri become the s3:// locations `sam deploy` would upload them to;
- Ref / Fn::GetAtt / Fn::Sub in the translated policies and environments are resolved to the test
  bucket, queue and secret; anything else unresolved fails loudly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import boto3
from samtranslator.parser.parser import Parser
from samtranslator.translator.translator import Translator
from samtranslator.yaml_helper import yaml_parse

TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"
REGION = "us-east-1"
ACCOUNT = "123456789012"

# The AWS managed policies SAM attaches (logging, SQS polling by the Lambda service, X-Ray, VPC ENIs).
# They are not loaded into the test IAM (their documents are AWS's); the tier checks that a role
# carries no managed policy beyond these, so the inline policies are all the code can use for data.
MANAGED_POLICIES = {
    "AWSLambdaBasicExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "AWSLambdaSQSQueueExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole",
    "AWSXrayWriteOnlyAccess": "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
    "AWSLambdaVPCAccessExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
}


# Functions another function invokes: the search function fans out to the shard search function.
INVOKED_FUNCTIONS = ("ShardSearchFunction",)


@dataclass(frozen=True)
class DeployedResources:
    """What the template's resources are in the test account."""

    bucket: str
    queue_url: str
    queue_arn: str
    secret_arn: str
    model_id: str
    deletion_queue_url: str = ""
    deletion_queue_arn: str = ""


@dataclass(frozen=True)
class FunctionRole:
    function: str  # the template's logical id, e.g. PreprocessFunction
    policy_documents: list[dict]  # the role's inline policies, resolved
    managed_policy_arns: list[str]
    environment: dict[str, str]  # Globals merged with the function's own variables, resolved


def translated_template(parameters: dict[str, str]) -> dict:
    template = yaml_parse(TEMPLATE.read_text(encoding="utf-8"))
    template = _apply_language_extensions(template, parameters)
    template["Transform"] = "AWS::Serverless-2016-10-31"
    for name, resource in template["Resources"].items():
        for uri in ("CodeUri", "ContentUri"):
            if uri in resource.get("Properties", {}):
                resource["Properties"][uri] = f"s3://deployment-artifacts/{name}.zip"
    translator = Translator(MANAGED_POLICIES, Parser(), boto_session=boto3.Session(region_name=REGION))
    return translator.translate(template, parameters, get_managed_policy_map=lambda: MANAGED_POLICIES)


def function_roles(resources: DeployedResources) -> dict[str, FunctionRole]:
    """Every AWS::Lambda::Function of the translated template, with its role's policies."""
    parameters = {"DbSecretArn": resources.secret_arn, "ModelId": resources.model_id}
    translated = translated_template(parameters)
    values = _parameter_values(translated, parameters)
    cfn = translated["Resources"]
    roles = {}
    for name, resource in cfn.items():
        if resource["Type"] != "AWS::Lambda::Function":
            continue
        role_name = resource["Properties"]["Role"]["Fn::GetAtt"][0]
        role = cfn[role_name]["Properties"]
        resolve = _Resolver(resources, values)
        roles[name] = FunctionRole(
            function=name,
            policy_documents=[resolve(policy["PolicyDocument"]) for policy in role.get("Policies", [])],
            managed_policy_arns=list(role.get("ManagedPolicyArns", [])),
            environment=resolve(resource["Properties"].get("Environment", {}).get("Variables", {})),
        )
    return roles


def _parameter_values(template: dict, given: dict[str, str]) -> dict[str, str]:
    values = {name: str(spec.get("Default", "")) for name, spec in template.get("Parameters", {}).items()}
    return {**values, **given}


def _apply_language_extensions(template: dict, parameters: dict[str, str]) -> dict:
    values = _parameter_values(template, parameters)
    conditions: dict[str, bool] = {}

    def evaluate(node) -> object:
        if isinstance(node, dict) and len(node) == 1:
            (function, argument), = node.items()
            if function == "Ref":
                if argument not in values:
                    raise ValueError(f"condition refers to {argument!r}, not a parameter")
                if template["Parameters"][argument].get("Type") == "CommaDelimitedList":
                    return [item for item in values[argument].split(",") if item]
                return values[argument]
            if function == "Fn::Equals":
                return evaluate(argument[0]) == evaluate(argument[1])
            if function == "Fn::Not":
                return not evaluate(argument[0])
            if function == "Fn::And":
                return all(evaluate(item) for item in argument)
            if function == "Fn::Or":
                return any(evaluate(item) for item in argument)
            if function == "Fn::Join":
                separator, items = argument
                parts = evaluate(items) if isinstance(items, dict) else [evaluate(item) for item in items]
                return separator.join(parts)
            if function == "Condition":
                return conditions[argument]
        if isinstance(node, str):
            return node
        raise ValueError(f"cannot evaluate condition element {node!r}")

    for name, condition in template.get("Conditions", {}).items():
        conditions[name] = bool(evaluate(condition))

    def resolve_ifs(node):
        if isinstance(node, dict):
            if set(node) == {"Fn::If"}:
                name, when_true, when_false = node["Fn::If"]
                return resolve_ifs(when_true if conditions[name] else when_false)
            resolved = {key: resolve_ifs(value) for key, value in node.items()}
            return {key: value for key, value in resolved.items() if value != {"Ref": "AWS::NoValue"}}
        if isinstance(node, list):
            return [resolve_ifs(item) for item in node if item != {"Ref": "AWS::NoValue"}]
        return node

    return resolve_ifs(template)


class _Resolver:
    """Ref / GetAtt / Sub of the resources the functions touch, in the test account."""

    def __init__(self, resources: DeployedResources, parameters: dict[str, str]) -> None:
        bucket_arn = f"arn:aws:s3:::{resources.bucket}"
        self._refs = {
            **parameters,
            "ImagesBucket": resources.bucket,
            "IngestQueue": resources.queue_url,
            "DeletionQueue": resources.deletion_queue_url,
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::Partition": "aws",
            "AWS::StackName": "clipsearch-aws-rules",
        }
        self._attributes = {
            "ImagesBucket.Arn": bucket_arn,
            "IngestQueue.Arn": resources.queue_arn,
            "DeletionQueue.Arn": resources.deletion_queue_arn,
        }
        # A function a role may invoke: its deployed name and ARN (moto runs no function; the tier checks
        # the policy and calls the handlers itself).
        for function in INVOKED_FUNCTIONS:
            self._refs[function] = f"clipsearch-aws-rules-{function}"
            self._attributes[f"{function}.Arn"] = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:clipsearch-aws-rules-{function}"

    def __call__(self, node):
        if isinstance(node, dict):
            if len(node) == 1:
                (function, argument), = node.items()
                if function == "Ref":
                    return self._lookup(self._refs, argument, node)
                if function == "Fn::GetAtt":
                    return self._lookup(self._attributes, ".".join(argument), node)
                if function == "Fn::Sub":
                    return self._substitute(argument, node)
            return {key: self(value) for key, value in node.items()}
        if isinstance(node, list):
            return [self(item) for item in node]
        return node

    def _substitute(self, argument, node) -> str:
        text, extra = (argument, {}) if isinstance(argument, str) else (argument[0], self(argument[1]))

        def value(match: re.Match) -> str:
            name = match.group(1)
            if name in extra:
                return str(extra[name])
            table = self._attributes if "." in name and not name.startswith("AWS::") else self._refs
            return str(self._lookup(table, name, node))

        return re.sub(r"\$\{([^}!]+)\}", value, text)

    @staticmethod
    def _lookup(table: dict, name: str, node) -> str:
        if name not in table:
            raise ValueError(f"the tier does not know what {node!r} is in the test account")
        return table[name]
