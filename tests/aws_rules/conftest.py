"""The AWS-rules tier's world: moto with IAM enforced, one IAM user per function carrying its role's policies.

Each test gets a bucket, an ingest queue and an RDS-format database secret in an enforcing moto server,
the tiny model published under models/<model-id>/, and `world.run_as(function)`, which points the
function's environment (from the translated template) at them with that function's user's keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from psycopg.conninfo import conninfo_to_dict

# The integration tier's helpers (Lambda context, HTTP events, handler loading) are reused as they are.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from aws_world import AwsWorld, create_user  # noqa: E402
from template_roles import ACCOUNT, REGION, DeployedResources, function_roles  # noqa: E402

HERE = Path(__file__).resolve().parent
ADMIN_REQUESTS = 3  # create the administrator, give it its policy, create its key: then IAM is enforced
MODEL_ID = "random-tiny-seed0"
# `clipsearch migrate` runs as an operator, not as a function: the template has no role for it. This is
# the least an operator needs for it, and what the README's deploy steps imply.
OPERATOR_POLICY = {"Statement": [{"Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
                                  "Resource": "{secret_arn}"}]}


@pytest.fixture(scope="session")
def enforcing_endpoint() -> Iterator[str]:
    environment = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(ADMIN_REQUESTS)}
    server = subprocess.Popen([sys.executable, str(HERE / "enforcing_moto.py")], stdout=subprocess.PIPE,
                              env=environment, text=True)
    try:
        port = server.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the enforcing moto server did not start (exit code {server.poll()})")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def admin(enforcing_endpoint: str) -> boto3.Session:
    """An IAM user allowed everything: sets up each test's world under enforcement."""
    bootstrap = boto3.Session(aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap", region_name=REGION)
    iam = bootstrap.client("iam", endpoint_url=enforcing_endpoint)
    iam.create_user(UserName="aws-rules-admin")
    iam.put_user_policy(UserName="aws-rules-admin", PolicyName="everything", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="aws-rules-admin")["AccessKey"]
    session = boto3.Session(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"],
                            region_name=REGION)
    session.client("sts", endpoint_url=enforcing_endpoint).get_caller_identity()
    return session


@pytest.fixture
def world(enforcing_endpoint, admin, database_url, tiny_model_dir, tmp_path, monkeypatch) -> AwsWorld:
    suffix = uuid.uuid4().hex[:10]
    s3, sqs = admin.client("s3", endpoint_url=enforcing_endpoint), admin.client("sqs", endpoint_url=enforcing_endpoint)
    bucket = f"clipsearch-rules-{suffix}"
    s3.create_bucket(Bucket=bucket)
    queue_url = sqs.create_queue(QueueName=f"ingest-{suffix}")["QueueUrl"]
    queue_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:ingest-{suffix}"
    deletion_queue_url = sqs.create_queue(QueueName=f"deletions-{suffix}")["QueueUrl"]
    deletion_queue_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:deletions-{suffix}"
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [
        {"QueueArn": queue_arn, "Events": [event], "Filter": {"Key": {"FilterRules": [
            {"Name": "prefix", "Value": "datasets/"}]}}}
        for event in ("s3:ObjectCreated:*", "s3:ObjectRemoved:*")]})
    server = conninfo_to_dict(database_url)
    # The RDS secret format; the test server speaks no TLS, so the secret says so (RDS secrets may carry
    # extra keys; without one, clipsearch requires TLS).
    secret_string = json.dumps({"engine": "postgres", "host": server.get("host", "127.0.0.1"),
                                "port": int(server.get("port", 5432)), "username": server.get("user", "postgres"),
                                "password": server.get("password", ""), "dbname": server["dbname"],
                                "sslmode": "disable"})
    secret_arn = admin.client("secretsmanager", endpoint_url=enforcing_endpoint).create_secret(
        Name=f"clipsearch/catalog-{suffix}", SecretString=secret_string)["ARN"]
    for path in sorted(tiny_model_dir.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            s3.put_object(Bucket=bucket, Key=f"models/{MODEL_ID}/{path.relative_to(tiny_model_dir).as_posix()}",
                          Body=path.read_bytes())
    resources = DeployedResources(bucket, queue_url, queue_arn, secret_arn, MODEL_ID, deletion_queue_url,
                                  deletion_queue_arn)
    roles = function_roles(resources)
    iam = admin.client("iam", endpoint_url=enforcing_endpoint)
    keys = {name: create_user(iam, f"{name}-{suffix}", role.policy_documents) for name, role in roles.items()}
    operator = json.loads(json.dumps(OPERATOR_POLICY).replace("{secret_arn}", secret_arn))
    keys["operator"] = create_user(iam, f"operator-{suffix}", [operator])
    world = AwsWorld(enforcing_endpoint, admin, resources, roles, keys, database_url, tmp_path / "models",
                     monkeypatch)
    world.drain()  # the s3:TestEvent a new notification configuration may send
    return world
