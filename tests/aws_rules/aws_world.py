"""The AWS-rules tier's test account: resources, one IAM user per function, and a log of every AWS call."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from template_roles import REGION, DeployedResources, FunctionRole


@dataclass
class Call:
    """One AWS request a function made, as the enforcing endpoint answered it."""

    service: str
    operation: str
    target: str
    status: int
    error: str | None

    @property
    def denied(self) -> bool:
        return self.status == 403 or (self.error or "").startswith("AccessDenied")


@dataclass
class CallLog:
    calls: list[Call] = field(default_factory=list)

    def record(self, http_response, parsed, model, context, **_) -> None:
        params = context.get("aws_rules_params", {})
        target = params.get("Key") or params.get("Prefix") or params.get("SecretId") or params.get("QueueUrl") or ""
        if model.name == "DeleteObjects":
            target = ",".join(item["Key"] for item in params["Delete"]["Objects"])
            for error in parsed.get("Errors", []):
                self.calls.append(Call(model.service_model.service_name, model.name, error["Key"], 200,
                                       error["Code"]))
        error = parsed.get("Error", {}).get("Code") if http_response.status_code >= 300 else None
        self.calls.append(Call(model.service_model.service_name, model.name, target,
                               http_response.status_code, error))

    @staticmethod
    def remember_params(params, context, **_) -> None:
        context["aws_rules_params"] = dict(params)

    def denied(self) -> list[Call]:
        return [call for call in self.calls if call.denied]

    def made(self, operation: str, target_prefix: str = "") -> list[Call]:
        return [call for call in self.calls if call.operation == operation and call.target.startswith(target_prefix)]


def jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    """A real JPEG file with content of its own (smooth noise, so each image embeds differently)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@dataclass
class AwsWorld:
    endpoint: str
    admin: boto3.Session
    resources: DeployedResources
    roles: dict[str, FunctionRole]
    keys: dict[str, tuple[str, str]]  # function (or "operator") -> its user's access key
    database_url: str
    model_cache_dir: Path
    monkeypatch: pytest.MonkeyPatch

    def client(self, service: str, who: str = "admin"):
        if who == "admin":
            return self.admin.client(service, endpoint_url=self.endpoint)
        key_id, secret = self.keys[who]
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key_id, aws_secret_access_key=secret)

    def upload(self, key: str, data: bytes) -> str:
        return self.client("s3").put_object(Bucket=self.resources.bucket, Key=key, Body=data)["ETag"].strip('"')

    def keys_under(self, prefix: str) -> list[str]:
        listing = self.client("s3").list_objects_v2(Bucket=self.resources.bucket, Prefix=prefix)
        return [item["Key"] for item in listing.get("Contents", [])]

    def drain(self) -> dict:
        """The queue's messages as one Lambda SQS event, deleted from the queue as Lambda would on success."""
        sqs, records = self.client("sqs"), []
        while messages := sqs.receive_message(QueueUrl=self.resources.queue_url, MaxNumberOfMessages=10,
                                              AttributeNames=["All"]).get("Messages", []):
            for message in messages:
                records.append({
                    "messageId": message["MessageId"], "receiptHandle": message["ReceiptHandle"],
                    "body": message["Body"], "attributes": message.get("Attributes", {}),
                    "messageAttributes": {}, "md5OfBody": message["MD5OfBody"], "eventSource": "aws:sqs",
                    "eventSourceARN": self.resources.queue_arn, "awsRegion": REGION,
                })
                sqs.delete_message(QueueUrl=self.resources.queue_url, ReceiptHandle=message["ReceiptHandle"])
        return {"Records": records}

    @contextmanager
    def run_as(self, who: str, **extra_environment: str) -> Iterator[CallLog]:
        """The function's deployed environment and its user's keys; every AWS call it makes is logged."""
        from clipsearch import aws, wiring

        environment = dict(self.roles[who].environment) if who in self.roles else {}
        key_id, secret = self.keys[who]
        environment.update({
            "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": REGION,
            "CLIPSEARCH_S3_ENDPOINT_URL": self.endpoint, "CLIPSEARCH_SQS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": self.endpoint,
            "CLIPSEARCH_MODEL_CACHE_DIR": str(self.model_cache_dir / who),
            "POWERTOOLS_METRICS_DISABLED": "true",
            **extra_environment,
        })
        for name in ("CLIPSEARCH_DATABASE_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            self.monkeypatch.delenv(name, raising=False)
        for name, value in environment.items():
            self.monkeypatch.setenv(name, value)
        log = CallLog()
        aws.forget_session()  # the process's session caches the credentials it first found
        aws.aws_session().register("provide-client-params", CallLog.remember_params)
        aws.aws_session().register("after-call", log.record)
        _clear_wiring(wiring)
        try:
            yield log
        finally:
            if wiring.get_database.cache_info().currsize:
                wiring.get_database().close()
            _clear_wiring(wiring)
            aws.forget_session()


def _clear_wiring(wiring) -> None:
    for factory in vars(wiring).values():
        if hasattr(factory, "cache_clear"):
            factory.cache_clear()


def create_user(iam, name: str, documents: list[dict]) -> tuple[str, str]:
    iam.create_user(UserName=name)
    for position, document in enumerate(documents):
        iam.put_user_policy(UserName=name, PolicyName=f"policy{position}",
                            PolicyDocument=json.dumps({"Version": "2012-10-17", **document}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]
