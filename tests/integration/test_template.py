"""template.yaml: linters clean, both auth modes translate, invariants hold, events match, sam build fits Lambda."""

from __future__ import annotations

import datetime
import fnmatch
import functools
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from aws_lambda_powertools.utilities.parser.models import (
    APIGatewayProxyEventV2Model,
    S3Model,
    SqsModel,
)
from clipsearch.adapters.postgres_connection import RDS_CA_BUNDLE
from clipsearch_tools.local.template import CloudFormationLoader
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "template.yaml"
EVENTS = REPO / "events"
SAM_VENV = REPO / ".venv-sam"
# Lambda's limit for a function and all its layers, unzipped.
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024
# Project dependencies only the tools (clipsearch_tools: CLI, local stack) import; the layer leaves them out.
TOOLS_ONLY_DEPENDENCIES = {"pyyaml", "tqdm", "h11"}  # h11: the local gateway's HTTP parsing
# Top-level names in the layer that would mean tools, or their dependencies, were packaged.
NOT_IN_LAYER = ("clipsearch_tools", "yaml", "_yaml", "tqdm", "moto", "torch", "transformers", "optimum")

EXPECTED_ROUTES = {
    ("SearchFunction", "POST", "/datasets/{dataset}/search/text"),
    ("SearchFunction", "POST", "/datasets/{dataset}/search/image"),
    ("SearchFunction", "GET", "/datasets/{dataset}/duplicates"),
    ("SearchFunction", "GET", "/openapi.json"),
    ("DatasetsFunction", "GET", "/datasets"),
    ("DatasetsFunction", "GET", "/datasets/{dataset}"),
    ("DatasetsFunction", "DELETE", "/datasets/{dataset}"),
}


@pytest.fixture(scope="module")
def template() -> dict:
    return yaml.load(TEMPLATE.read_text(), Loader=CloudFormationLoader)


@pytest.fixture(scope="module")
def resources(template: dict) -> dict:
    return template["Resources"]


def _functions(resources: dict) -> dict[str, dict]:
    return {name: r for name, r in resources.items() if r["Type"] == "AWS::Serverless::Function"}


def _sam_env() -> dict[str, str]:
    if not (SAM_VENV / "bin" / "sam").exists():
        pytest.skip(f"aws-sam-cli is not installed in {SAM_VENV} (see infra/README.md)")
    return {
        **os.environ,
        "SAM_CLI_TELEMETRY": "0",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "PYTHON": str(SAM_VENV / "bin" / "python"),
    }


def _run(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


# --- the linters and the SAM translator -------------------------------------------------------


def test_cfn_lint_reports_nothing():
    result = _run([str(SAM_VENV / "bin" / "cfn-lint"), str(TEMPLATE)], _sam_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_sam_validate_lint_is_clean():
    result = _run([str(SAM_VENV / "bin" / "sam"), "validate", "--lint", "--template-file", str(TEMPLATE)], _sam_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is a valid SAM Template" in result.stdout + result.stderr


_TRANSLATE = """
import json, sys
from samcli.lib.translate.sam_template_validator import SamTemplateValidator
from samcli.yamlhelper import yaml_parse
import yaml

class NoManagedPolicies:
    def load(self):
        return {}

template = yaml_parse(open(sys.argv[1]).read())
validator = SamTemplateValidator(template, NoManagedPolicies(), region="us-east-1",
                                 parameter_overrides=json.loads(sys.argv[2]), language_extensions_enabled=True)
print(json.dumps(yaml.safe_load(validator.get_translated_template_if_valid())))
"""


@functools.lru_cache(maxsize=None)
def _translated_json(parameters: str) -> str:
    parameters = json.dumps({"DbSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:db-AbCdEf",
                             **json.loads(parameters)})
    result = _run([str(SAM_VENV / "bin" / "python"), "-c", _TRANSLATE, str(TEMPLATE), parameters], _sam_env())
    assert result.returncode == 0, result.stderr
    return result.stdout


def _translated(parameters: dict[str, str]) -> dict:
    """The template as CloudFormation will get it: LanguageExtensions, then SAM (SAM CLI's own translator)."""
    return json.loads(_translated_json(json.dumps(parameters, sort_keys=True)))


def _translated_api(parameters: dict[str, str]) -> dict:
    """The HTTP API's OpenAPI body as CloudFormation will get it."""
    body = _translated(parameters)["Resources"]["ClipsearchApi"]["Properties"]["Body"]
    return {"paths": body["paths"], "schemes": body["components"]["securitySchemes"]}


def _route_security(api: dict) -> dict[str, list]:
    return {
        f"{method.upper()} {path}": operation["security"]
        for path, operations in api["paths"].items()
        for method, operation in operations.items()
    }


def test_every_route_requires_iam_by_default():
    api = _translated_api({})
    routes = _route_security(api)
    assert set(routes) == {f"{method} {path}" for _, method, path in EXPECTED_ROUTES}
    assert all(security == [{"AWS_IAM": []}] for security in routes.values()), routes
    assert api["schemes"]["AWS_IAM"]["x-amazon-apigateway-authtype"] == "awsSigv4"


def test_jwt_mode_puts_the_jwt_authorizer_on_every_route_and_delete_needs_the_admin_scope():
    api = _translated_api(
        {"AuthMode": "JWT", "JwtIssuer": "https://issuer.example.com/", "JwtAudience": "client-a,client-b"}
    )
    routes = _route_security(api)
    assert routes.pop("DELETE /datasets/{dataset}") == [{"JwtAuthorizer": ["clipsearch/admin"]}]
    assert all(security == [{"JwtAuthorizer": []}] for security in routes.values()), routes
    jwt = api["schemes"]["JwtAuthorizer"]["x-amazon-apigateway-authorizer"]
    assert jwt["jwtConfiguration"] == {"issuer": "https://issuer.example.com/", "audience": ["client-a", "client-b"]}


def _execute_api_arn(method: str, path: str) -> str:
    """What IAM authorizes a call of this route as (a dataset named "pets", the $default stage)."""
    return f"arn:aws:execute-api:us-east-1:123456789012:a1b2c3/$default/{method}{path.replace('{dataset}', 'pets')}"


def _invocable_routes(policy: dict) -> set[tuple[str, str]]:
    patterns = []
    for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
        assert statement["Effect"] == "Allow" and statement["Action"] == "execute-api:Invoke"
        for resource in _as_list(statement["Resource"]):
            patterns.append(resource["Fn::Sub"].replace("${AWS::Partition}", "aws").replace("${AWS::Region}", "us-east-1")
                            .replace("${AWS::AccountId}", "123456789012").replace("${ClipsearchApi}", "a1b2c3"))
    return {(method, path) for _, method, path in EXPECTED_ROUTES
            if any(fnmatch.fnmatchcase(_execute_api_arn(method, path), pattern) for pattern in patterns)}


def test_iam_mode_lets_only_the_admin_policy_delete_datasets(resources: dict):
    readable = {(method, path) for _, method, path in EXPECTED_ROUTES if method != "DELETE"}
    assert _invocable_routes(resources["ApiSearchPolicy"]) == readable
    assert _invocable_routes(resources["ApiAdminPolicy"]) == {("DELETE", "/datasets/{dataset}")}


def test_api_throttles_and_logs_every_request_to_a_retained_log_group(template: dict):
    (stage,) = [r for r in _translated({})["Resources"].values() if r["Type"] == "AWS::ApiGatewayV2::Stage"]
    settings = stage["Properties"]
    assert settings["DefaultRouteSettings"] == {"ThrottlingRateLimit": 50, "ThrottlingBurstLimit": 20}
    defaults = template["Parameters"]
    # a burst the API lets through must fit the search function's reserved instances, even all cold
    assert defaults["ApiThrottlingBurstLimit"]["Default"] <= defaults["SearchReservedConcurrency"]["Default"]
    assert settings["AccessLogSettings"]["DestinationArn"] == {"Fn::GetAtt": ["ApiAccessLogGroup", "Arn"]}
    entry = json.loads(settings["AccessLogSettings"]["Format"])
    assert {"requestId", "ip", "caller", "route", "status"} <= set(entry)
    assert template["Resources"]["ApiAccessLogGroup"]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    throttled = _translated({"ApiThrottlingRateLimit": "7", "ApiThrottlingBurstLimit": "9"})
    (stage,) = [r for r in throttled["Resources"].values() if r["Type"] == "AWS::ApiGatewayV2::Stage"]
    limits = {name: int(value) for name, value in stage["Properties"]["DefaultRouteSettings"].items()}
    assert limits == {"ThrottlingRateLimit": 7, "ThrottlingBurstLimit": 9}


# A db.t4g.micro RDS PostgreSQL (1 GiB) allows ~80 connections; keep the defaults' worst case under it.
SMALLEST_DATABASE_CONNECTIONS = 80


def _reserved(parameters: dict[str, str]) -> dict[str, int | None]:
    return {name: r["Properties"].get("ReservedConcurrentExecutions")
            for name, r in _translated(parameters)["Resources"].items() if r["Type"] == "AWS::Lambda::Function"}


def test_database_facing_http_functions_have_reserved_concurrency_unless_zero(template: dict):
    reserved = _reserved({})
    assert (reserved["SearchFunction"], reserved["DatasetsFunction"]) == (20, 5)
    unreserved = _reserved({"SearchReservedConcurrency": "0", "DatasetsReservedConcurrency": "0"})
    assert (unreserved["SearchFunction"], unreserved["DatasetsFunction"]) == (None, None)
    defaults = template["Parameters"]
    # each instance holds one connection; compaction and reconciliation run one at a time on a schedule
    connections = (defaults["PreprocessMaxConcurrency"]["Default"] + defaults["SearchReservedConcurrency"]["Default"]
                   + defaults["DatasetsReservedConcurrency"]["Default"] + 2)
    assert connections <= SMALLEST_DATABASE_CONNECTIONS


def test_bucket_is_versioned_and_old_versions_and_delete_markers_expire(resources: dict):
    properties = resources["ImagesBucket"]["Properties"]
    assert properties["VersioningConfiguration"] == {"Status": "Enabled"}
    rules = {rule["Id"]: rule for rule in properties["LifecycleConfiguration"]["Rules"]}
    assert all(rule["Status"] == "Enabled" for rule in rules.values())
    assert rules["ExpireNoncurrentVersions"]["NoncurrentVersionExpiration"] == {
        "NoncurrentDays": {"Ref": "NoncurrentVersionRetentionDays"}}
    assert "Prefix" not in rules["ExpireNoncurrentVersions"]
    assert rules["ExpireNoncurrentSegments"]["Prefix"] == "indexes/"
    assert rules["ExpireNoncurrentThumbnails"]["Prefix"] == "thumbnails/"
    assert rules["RemoveExpiredDeleteMarkers"]["ExpiredObjectDeleteMarker"] is True
    for name, statement in _allow_statements(resources):
        assert not {"s3:DeleteObjectVersion", "s3:PutBucketVersioning", "s3:PutLifecycleConfiguration"} & set(
            _as_list(statement["Action"])), name


def test_bucket_access_is_logged_to_a_private_bucket_only_s3_logging_writes(resources: dict):
    logging = resources["ImagesBucket"]["Properties"]["LoggingConfiguration"]
    assert logging == {"DestinationBucketName": {"Ref": "AccessLogsBucket"}, "LogFilePrefix": "images/"}
    log_bucket = resources["AccessLogsBucket"]["Properties"]
    assert log_bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "AES256"}  # the only encryption S3 log delivery supports
    assert all(log_bucket["PublicAccessBlockConfiguration"].values())
    (expiry,) = log_bucket["LifecycleConfiguration"]["Rules"]
    assert expiry["ExpirationInDays"] == {"Ref": "LogRetentionDays"}
    (delivery,) = [s for _, s in _allow_statements({"p": resources["AccessLogsBucketPolicy"]})]
    assert delivery["Principal"] == {"Service": "logging.s3.amazonaws.com"} and delivery["Action"] == "s3:PutObject"
    source = delivery["Condition"]["ArnLike"]["aws:SourceArn"]["Fn::Sub"]
    bucket_name = resources["ImagesBucket"]["Properties"]["BucketName"]["Fn::Sub"]
    assert source == ["arn:${AWS::Partition}:s3:::" + bucket_name[0], bucket_name[1]]
    assert "AccessLogsBucketPolicy" in _as_list(resources["ImagesBucket"]["DependsOn"])


@pytest.mark.parametrize("bucket, policy", [("ImagesBucket", "ImagesBucketPolicy"),
                                            ("AccessLogsBucket", "AccessLogsBucketPolicy")])
def test_bucket_refuses_requests_without_tls(resources: dict, bucket: str, policy: str):
    statements = resources[policy]["Properties"]["PolicyDocument"]["Statement"]
    (deny,) = [s for s in statements if s.get("Sid") == "DenyInsecureTransport"]
    assert (deny["Effect"], deny["Principal"], deny["Action"]) == ("Deny", "*", "s3:*")
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert deny["Resource"] == [{"Fn::GetAtt": [bucket, "Arn"]}, {"Fn::Sub": f"${{{bucket}.Arn}}/*"}]


CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
CHECKOV_SUPPRESSIONS = REPO / "infra" / "checkov-suppressions.yaml"
JWT_MODE = {"AuthMode": "JWT", "JwtIssuer": "https://issuer.example.com/", "JwtAudience": "client-a"}


def test_checkov_finds_nothing_beyond_the_listed_suppressions(tmp_path: Path):
    if not CHECKOV.exists():
        pytest.skip(f"checkov is not installed in {CHECKOV.parent.parent} (scripts/bootstrap.sh installs it)")
    files = []
    for name, parameters in (("iam-mode.json", {}), ("jwt-mode.json", JWT_MODE)):
        (tmp_path / name).write_text(_translated_json(json.dumps(parameters, sort_keys=True)))
        files += ["--file", str(tmp_path / name)]
    # No platform downloads; a dead loopback proxy makes any request checkov still tries fail on this machine.
    environment = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "HTTPS_PROXY": "http://127.0.0.1:9",
                   "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    result = _run([str(CHECKOV), *files, "--framework", "cloudformation", "--skip-download", "--output", "json",
                   "--quiet"], environment, timeout=600)
    assert result.returncode in (0, 1), result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)
    summary, failed_checks = report["summary"], report["results"]["failed_checks"]
    assert summary["parsing_errors"] == 0 and summary["passed"] > 100, summary
    found = {(check["check_id"], check["resource"]) for check in failed_checks}

    suppressions = yaml.safe_load(CHECKOV_SUPPRESSIONS.read_text())
    assert all(len(entry["reason"].split()) >= 10 for entry in suppressions.values()), "every suppression says why"
    suppressed = {(check_id, resource) for check_id, entry in suppressions.items() for resource in entry["resources"]}
    assert sorted(found - suppressed) == [], "new checkov findings: fix them or list them with a reason"
    assert sorted(suppressed - found) == [], "suppressions that no longer fire: remove them"


# --- structural invariants ----------------------------------------------------------------------


def test_queue_visibility_timeout_is_at_least_six_preprocess_timeouts(resources: dict):
    preprocess = resources["PreprocessFunction"]["Properties"]
    queue = resources["IngestQueue"]["Properties"]
    assert queue["VisibilityTimeout"] >= 6 * preprocess["Timeout"]


def test_preprocess_reads_the_queue_in_batches_with_partial_failures(resources: dict):
    (event,) = resources["PreprocessFunction"]["Properties"]["Events"].values()
    assert event["Type"] == "SQS"
    properties = event["Properties"]
    assert properties["Queue"] == {"Fn::GetAtt": ["IngestQueue", "Arn"]}
    assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert 1 < properties["BatchSize"] <= 10_000
    assert properties["MaximumBatchingWindowInSeconds"] > 0


def test_queue_dead_letters_after_five_receives_and_the_dead_letters_alarm(resources: dict):
    redrive = resources["IngestQueue"]["Properties"]["RedrivePolicy"]
    assert redrive == {"deadLetterTargetArn": {"Fn::GetAtt": ["IngestDeadLetterQueue", "Arn"]}, "maxReceiveCount": 5}
    alarm = resources["IngestDeadLetterAlarm"]["Properties"]
    assert alarm["Namespace"] == "AWS/SQS" and alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": ["IngestDeadLetterQueue", "QueueName"]}}
    ]


def test_bucket_notifies_the_queue_of_creations_and_removals_under_datasets(resources: dict):
    bucket = resources["ImagesBucket"]
    configurations = bucket["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
    assert {c["Event"] for c in configurations} == {"s3:ObjectCreated:*", "s3:ObjectRemoved:*"}
    for configuration in configurations:
        assert configuration["Queue"] == {"Fn::GetAtt": ["IngestQueue", "Arn"]}
        assert configuration["Filter"]["S3Key"]["Rules"] == [{"Name": "prefix", "Value": "datasets/"}]
    assert "IngestQueuePolicy" in _as_list(bucket["DependsOn"])


def test_queue_policy_names_the_bucket_by_the_same_computed_name(resources: dict):
    bucket_name = resources["ImagesBucket"]["Properties"]["BucketName"]["Fn::Sub"]
    (statement,) = resources["IngestQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
    source_arn = statement["Condition"]["ArnEquals"]["aws:SourceArn"]["Fn::Sub"]
    assert source_arn[0] == "arn:${AWS::Partition}:s3:::" + bucket_name[0]
    assert source_arn[1] == bucket_name[1]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"} and statement["Action"] == "sqs:SendMessage"


def test_bucket_is_encrypted_and_never_public(resources: dict):
    properties = resources["ImagesBucket"]["Properties"]
    (rule,) = properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms"}
    assert all(properties["PublicAccessBlockConfiguration"].values())
    assert len(properties["PublicAccessBlockConfiguration"]) == 4


def _allow_statements(resources: dict) -> list[tuple[str, dict]]:
    statements = [
        (name, statement)
        for name, function in _functions(resources).items()
        for policy in function["Properties"].get("Policies", [])
        for statement in policy["Statement"]
    ]
    statements += [
        (name, statement)
        for name, r in resources.items()
        if r["Type"] in {"AWS::SQS::QueuePolicy", "AWS::S3::BucketPolicy", "AWS::IAM::Policy"}
        for statement in r["Properties"]["PolicyDocument"]["Statement"]
    ]
    return [(name, s) for name, s in statements if s["Effect"] == "Allow"]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_no_policy_allows_a_wildcard_action(resources: dict):
    for name, statement in _allow_statements(resources):
        for action in _as_list(statement["Action"]):
            assert "*" not in action, f"{name}: {statement.get('Sid')} allows {action}"


def test_bucket_permissions_are_scoped_to_the_bucket_and_its_prefixes(resources: dict):
    allowed_objects = {f"${{ImagesBucket.Arn}}/{prefix}/*" for prefix in ("datasets", "indexes", "models", "thumbnails")}
    allowed_objects.add("${AccessLogsBucket.Arn}/images/*")  # S3 log delivery (the test above checks who)
    for name, statement in _allow_statements(resources):
        for action in _as_list(statement["Action"]):
            if not action.startswith("s3:"):
                continue
            for resource in _as_list(statement["Resource"]):
                if action == "s3:ListBucket":
                    assert resource == {"Fn::GetAtt": ["ImagesBucket", "Arn"]}, name
                else:
                    assert resource.get("Fn::Sub") in allowed_objects, f"{name}: {action} on {resource}"


def test_only_the_database_secret_is_readable(resources: dict):
    for name, function in _functions(resources).items():
        secret_statements = [
            s for _, s in _allow_statements({name: function}) if "secretsmanager:GetSecretValue" in _as_list(s["Action"])
        ]
        assert [s["Resource"] for s in secret_statements] == [{"Ref": "DbSecretArn"}], name


def test_every_function_code_and_handler_module_exist(resources: dict):
    for name, function in _functions(resources).items():
        properties = function["Properties"]
        code = REPO / properties["CodeUri"]
        module, _, attribute = properties["Handler"].rpartition(".")
        source = code / f"{module.replace('.', '/')}.py"
        assert source.is_file(), f"{name}: {source} is missing"
        assert re.search(rf"^def {attribute}\(", source.read_text(), re.MULTILINE), f"{name}: no {attribute}()"


def test_http_routes_are_the_api_of_the_search_and_dataset_functions(resources: dict):
    routes = {
        (name, event["Properties"]["Method"], event["Properties"]["Path"])
        for name, function in _functions(resources).items()
        for event in function["Properties"].get("Events", {}).values()
        if event["Type"] == "HttpApi"
    }
    assert routes == EXPECTED_ROUTES
    for function in _functions(resources).values():
        for event in function["Properties"].get("Events", {}).values():
            if event["Type"] == "HttpApi":
                assert event["Properties"]["ApiId"] == {"Ref": "ClipsearchApi"}


def test_api_defaults_to_iam_auth(template: dict, resources: dict):
    assert template["Parameters"]["AuthMode"]["Default"] == "IAM"
    assert template["Conditions"]["UseJwtAuth"] == {"Fn::Equals": [{"Ref": "AuthMode"}, "JWT"]}
    auth = resources["ClipsearchApi"]["Properties"]["Auth"]
    assert auth["EnableIamAuthorizer"] is True
    assert auth["DefaultAuthorizer"] == {"Fn::If": ["UseJwtAuth", "JwtAuthorizer", "AWS_IAM"]}


def test_scheduled_functions_run_on_the_configured_schedules(resources: dict):
    for name, parameter in (("CompactFunction", "CompactionSchedule"), ("ReconcileFunction", "ReconcileSchedule")):
        (event,) = resources[name]["Properties"]["Events"].values()
        assert event["Type"] == "Schedule" and event["Properties"]["Schedule"] == {"Ref": parameter}


def test_layer_pins_match_the_project_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    layer = {
        canonicalize_name(r.name): r
        for r in map(Requirement, _requirement_lines(REPO / "shared" / "requirements.txt"))
    }
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "boto3" or name in TOOLS_ONLY_DEPENDENCIES:  # the Lambda runtime has boto3
            assert name not in layer, f"{name} must not be in shared/requirements.txt"
            continue
        assert name in layer, f"{name} is missing from shared/requirements.txt"
        pinned = next(iter(layer[name].specifier)).version
        assert requirement.specifier.contains(pinned), f"{name}: layer pins {pinned}, project wants {requirement}"
        assert requirement.extras <= layer[name].extras


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


# --- events for `sam local invoke -e` -------------------------------------------------------------


@pytest.mark.parametrize("name, event_name", [("sqs-s3-put.json", "ObjectCreated:Put"), ("sqs-s3-delete.json", "ObjectRemoved:Delete")])
def test_sqs_events_carry_s3_notifications_for_a_dataset_image(name: str, event_name: str):
    sqs = SqsModel.model_validate_json((EVENTS / name).read_text())
    (record,) = sqs.Records
    notification = S3Model.model_validate_json(record.body)
    (s3_record,) = notification.Records
    assert s3_record.eventName == event_name
    assert s3_record.s3.object.key == "datasets/demo/beach_1.jpeg"


@pytest.mark.parametrize(
    "name, route_key",
    [
        ("http-search-text.json", "POST /datasets/{dataset}/search/text"),
        ("http-search-image-key.json", "POST /datasets/{dataset}/search/image"),
        ("http-list-datasets.json", "GET /datasets"),
    ],
)
def test_http_events_are_v2_payloads_of_template_routes(name: str, route_key: str):
    event = APIGatewayProxyEventV2Model.model_validate_json((EVENTS / name).read_text())
    assert event.routeKey == route_key == event.requestContext.routeKey
    method, route = route_key.split(" ", 1)
    assert (method, route) in {(m, p) for _, m, p in EXPECTED_ROUTES}
    assert event.requestContext.http.method == method
    expected_path = route.replace("{dataset}", (event.pathParameters or {}).get("dataset", ""))
    assert event.rawPath == expected_path


def test_events_readme_names_every_event_file():
    readme = (EVENTS / "README.md").read_text()
    for path in EVENTS.glob("*.json"):
        assert f"events/{path.name}" in readme


# --- sam build ------------------------------------------------------------------------------------


def test_sam_build_packages_a_layer_that_fits_lambda(tmp_path: Path):
    build_dir = tmp_path / "build"
    ca_bundle = tmp_path / "global-bundle.pem"
    ca_bundle.write_bytes(_self_signed_ca_pem("test RDS root"))
    # infra/Makefile compiles the bytecode with a python3.13; on a machine without one it would refuse to build.
    lambda_python = subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "infra" / "Makefile"),
                                    "print-lambda-python"], capture_output=True, text=True).stdout.strip()
    result = _run(
        [
            str(SAM_VENV / "bin" / "sam"), "build", "--template-file", str(TEMPLATE), "--base-dir", str(REPO),
            "--build-dir", str(build_dir), "--cache-dir", str(tmp_path / "cache"),
        ],
        {**_sam_env(), "RDS_CA_BUNDLE": str(ca_bundle), **({} if lambda_python else {"BYTECODE": "none"})},
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the layer unpacks under /opt, where the functions look for the database's CA bundle
    packaged_bundle = build_dir / "ClipsearchLayer" / RDS_CA_BUNDLE.removeprefix("/opt/")
    assert packaged_bundle.read_bytes() == ca_bundle.read_bytes()
    layer = build_dir / "ClipsearchLayer" / "python"
    assert (layer / "clipsearch" / "__init__.py").is_file()
    _assert_layer_bytecode(layer, compiled=bool(lambda_python))
    packaged = {path.name.removesuffix(".py") for path in layer.iterdir()}
    assert not packaged & set(NOT_IN_LAYER), f"tools in the layer: {sorted(packaged & set(NOT_IN_LAYER))}"
    distributions = {canonicalize_name(path.name.split("-")[0]) for path in layer.glob("*.dist-info")}
    assert not distributions & TOOLS_ONLY_DEPENDENCIES
    assert not (layer / "clipsearch" / "cli").exists() and not (layer / "clipsearch" / "local").exists()
    layer_bytes = _tree_bytes(layer.parent)
    print(f"layer unzipped: {layer_bytes} bytes ({layer_bytes / 2**20:.1f} MiB) of {LAMBDA_UNZIPPED_LIMIT / 2**20:.0f} MiB")
    for name in ("PreprocessFunction", "SearchFunction", "DatasetsFunction", "CompactFunction", "ReconcileFunction"):
        function_dir = build_dir / name
        assert (function_dir / "app.py").is_file()
        assert layer_bytes + _tree_bytes(function_dir) < LAMBDA_UNZIPPED_LIMIT, f"{name}: {layer_bytes} bytes of layer"
    _assert_layer_dependencies_complete(layer)


def _assert_layer_bytecode(layer: Path, compiled: bool) -> None:
    """The runtime's bytecode only (none of the build machine's Python): the dependencies' pycs in place of their
    sources, clipsearch's beside its kept sources (tests/infra/test_layer_bytecode.py checks they load)."""
    pycs = list(layer.rglob("*.pyc"))
    if not compiled:
        assert not pycs and not list(layer.rglob("__pycache__"))
        return
    assert {path.relative_to(layer).parts[0] for path in layer.rglob("__pycache__")} == {"clipsearch"}
    assert all(".cpython-313." in path.name for path in pycs if path.parent.name == "__pycache__")
    assert not [path for path in layer.rglob("*.py") if path.relative_to(layer).parts[0] != "clipsearch"]
    assert (layer / "numpy" / "__init__.pyc").is_file()
    assert (layer / "clipsearch" / "__pycache__" / "__init__.cpython-313.pyc").is_file()


def _self_signed_ca_pem(name: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)


def _tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def _assert_layer_dependencies_complete(layer: Path) -> None:
    """--no-deps installs: every requirement of every installed distribution must be installed too."""
    installed: dict[str, dict] = {}
    for metadata_path in layer.glob("*.dist-info/METADATA"):
        text = metadata_path.read_text(encoding="utf-8", errors="replace")
        name = canonicalize_name(re.search(r"^Name: (.+)$", text, re.MULTILINE).group(1))
        installed[name] = {"requires": re.findall(r"^Requires-Dist: (.+)$", text, re.MULTILINE)}
    requested = {
        canonicalize_name(r.name): r.extras
        for r in map(Requirement, _requirement_lines(REPO / "shared" / "requirements.txt"))
    }
    assert set(requested) <= set(installed)
    lambda_environment = {"python_version": "3.13", "python_full_version": "3.13.0", "sys_platform": "linux",
                          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                          "platform_python_implementation": "CPython", "os_name": "posix"}
    # Only Tokenizer.from_pretrained needs huggingface-hub; the layer loads tokenizer.json from the model
    # directory. botocore (aws-xray-sdk's) is part of the Lambda runtime, like boto3.
    left_out = {"huggingface-hub", "botocore"}
    for name, dist in installed.items():
        for line in dist["requires"]:
            requirement = Requirement(line)
            extras = requested.get(name, set()) | {""}
            if requirement.marker and not any(
                requirement.marker.evaluate({**lambda_environment, "extra": extra}) for extra in extras
            ):
                continue
            dependency = canonicalize_name(requirement.name)
            assert dependency in installed or dependency in left_out, f"{name} needs {requirement}, not in the layer"
