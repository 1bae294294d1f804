"""Runs moto's server with IAM enforcement and the AWS authorization rules moto leaves out (a subprocess).

Run as `python enforcing_moto.py`: prints the port it listens on (127.0.0.1), then serves until killed.
Start it with INITIAL_NO_AUTH_ACTION_COUNT set: the first N requests (creating an administrator user)
are unauthenticated, every later one is checked against its IAM user's policies.

moto 5.2.5 checks a user's policies for every request, but differs from AWS in ways that would let a
wrong template pass or a right one fail; each patch below brings one rule back:
- a DeleteObjects request needs s3:DeleteObject on every key (moto checks the bucket ARN only);
- SendMessageBatch needs sqs:SendMessage (the batch operations have no IAM actions of their own);
- GetSecretValue is checked against the secret's ARN (moto checks "*", so no scoped policy matches);
- Lambda's Invoke is lambda:InvokeFunction on the function's ARN (moto checks lambda:Invoke on "*");
- StringLike / StringEquals conditions on s3:prefix are evaluated (moto ignores StringLike, and passes no
  request values), an Allow whose condition fails does not apply (moto turns it into an explicit Deny),
  and a condition this module cannot evaluate fails the request instead of being ignored;
- reading a missing key answers 404 only to callers allowed s3:ListBucket (no prefix), else 403;
- a presigned URL (SigV4 query authentication) is its signer's request: its signature and expiry are
  checked, then the signer's policies (moto reads the Authorization header only, and fails without it).
"""

from __future__ import annotations

import fnmatch
import signal
import sys
import threading
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, parse_qsl, urlparse, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from moto.awslambda.responses import LambdaResponse
from moto.iam import access_control
from moto.iam.access_control import IAMPolicy, IAMPolicyStatement, PermissionResult
from moto.s3 import responses as s3_responses
from moto.s3.exceptions import BucketAccessDeniedError
from moto.secretsmanager.responses import SecretsManagerResponse

IAM_ACTION_OF_OPERATION = {
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
    "lambda:Invoke": "lambda:InvokeFunction",
}


class UnsupportedCondition(Exception):
    """A policy condition this harness cannot evaluate: refusing beats silently allowing."""


def _condition_holds(operator: str, expected, actual: str | None) -> bool:
    patterns = expected if isinstance(expected, list) else [expected]
    if actual is None:  # AWS: a condition on a key the request lacks is false (no ...IfExists here)
        return False
    if operator == "StringLike":
        return any(fnmatch.fnmatchcase(actual, pattern) for pattern in patterns)
    if operator == "StringEquals":
        return actual in patterns
    raise UnsupportedCondition(operator)


def _statement_applies(self: IAMPolicyStatement, action: str, resource: str = "*", principal=None,
                       incoming_condition_values=None) -> PermissionResult:
    conditions = self._statement.get("Condition")
    if conditions and self._check_element_matches("Action", action) and self._statement.get("Resource"):
        values = incoming_condition_values or {}
        for operator, keys in conditions.items():
            for key, expected in keys.items():
                if not _condition_holds(operator, expected, values.get(key)):
                    return PermissionResult.NEUTRAL
        unconditional = IAMPolicyStatement({k: v for k, v in self._statement.items() if k != "Condition"})
        return unconditional.is_action_permitted(action, resource, principal)
    return _original_statement_check(self, action, resource, principal, incoming_condition_values)


def _request_condition_values(request: access_control.IAMRequestBase) -> dict[str, str]:
    if request._action != "s3:ListBucket":
        return {}
    query = parse_qs(urlparse(request._path).query)
    return {"s3:prefix": query["prefix"][0]} if "prefix" in query else {}


def _check_action_permitted(self: access_control.IAMRequestBase, resource: str) -> None:
    self._action = IAM_ACTION_OF_OPERATION.get(self._action, self._action)
    values = _request_condition_values(self)
    permitted = False
    for policy in self._access_key.collect_policies():
        result = IAMPolicy(policy).is_action_permitted(self._action, resource, None, values)
        if result == PermissionResult.DENIED:
            self._raise_access_denied()
        permitted = permitted or result == PermissionResult.PERMITTED
    if not permitted:
        self._raise_access_denied()


def _authorize_s3(self, bucket_name: str | None = None, key_name: str | None = None) -> None:
    _original_s3_check(self, bucket_name, key_name)
    if not (key_name and bucket_name and self.data.get("Action") == "GetObject" and _enforcing()):
        return
    if self.backend.get_object(bucket_name, key_name) is None:
        self.data["Action"] = "ListBucket"  # checked with the key request's (empty) query: no s3:prefix
        try:
            _original_s3_check(self, bucket_name)
        finally:
            self.data["Action"] = "GetObject"


def _request_init(self: access_control.IAMRequestBase, **request) -> None:
    query = urlsplit(request["path"]).query
    self._presigned_query = None
    if "Authorization" not in request["headers"] and "X-Amz-Credential=" in query:
        self._presigned_query = query
        credential = dict(parse_qsl(query))["X-Amz-Credential"]
        # moto finds the signer's access key in this header; the signature itself is checked below
        request["headers"] = {**dict(request["headers"]),
                              "Authorization": f"AWS4-HMAC-SHA256 Credential={credential}, Signature="}
    _original_request_init(self, **request)


def _check_signature(self: access_control.IAMRequestBase) -> None:
    if self._presigned_query is None:
        return _original_check_signature(self)
    query = dict(parse_qsl(self._presigned_query))
    signed_at = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    if datetime.now(timezone.utc) > signed_at + timedelta(seconds=int(query["X-Amz-Expires"])):
        self._raise_access_denied()
    unsigned = "&".join(item for item in self._presigned_query.split("&") if not item.startswith("X-Amz-Signature="))
    url = f"http://{self._headers['Host']}{urlsplit(self._path).path}?{unsigned}"
    request = AWSRequest(method=self._method, url=url)
    request.context["timestamp"] = query["X-Amz-Date"]
    _, _, region, service, _ = query["X-Amz-Credential"].split("/")
    auth = S3SigV4QueryAuth(self._access_key.create_credentials(), service, region, int(query["X-Amz-Expires"]))
    signature = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    if query.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or signature != query["X-Amz-Signature"]:
        self._raise_signature_does_not_match()


def _enforcing() -> bool:
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    return ActionAuthenticatorMixin.request_count >= settings.INITIAL_NO_AUTH_ACTION_COUNT


def _delete_keys(self, bucket_name: str, authenticated: bool = True):
    """Every key of a DeleteObjects request is authorized as s3:DeleteObject; one refused key refuses
    the whole request (stricter than AWS, which deletes the others: no test here mixes them)."""
    import xmltodict

    objects = xmltodict.parse(self.body, strip_whitespace=False)["Delete"].get("Object", [])
    objects = objects if isinstance(objects, list) else [objects]
    try:
        for item in objects:
            _original_s3_check(self, bucket_name, item["Key"])
    except BucketAccessDeniedError:
        authenticated = False
    return _original_delete_keys(self, bucket_name, authenticated)


def _bucket_post(self, request, bucket_name: str):
    self.path = self._get_path(request)  # what is_delete_keys reads; moto sets it in the method replaced here
    if self.is_delete_keys():  # moto's own path checks the bucket ARN; the keys are checked in _delete_keys
        self.data["Action"] = "DeleteObject"
        return self._bucket_response_delete_keys(bucket_name)
    return _original_bucket_post(self, request, bucket_name)


def _secret_resource(self) -> str:
    secret_id = self._get_param("SecretId")
    try:
        return self.backend.describe_secret(secret_id).arn if secret_id else "*"
    except Exception:  # an unknown secret: AWS answers AccessDenied before ResourceNotFound too
        return f"arn:aws:secretsmanager:{self.region}:{self.current_account}:secret:{secret_id}"


def _function_resource(self) -> str:
    """The invoked function's ARN, from /2015-03-31/functions/<name or ARN>/invocations."""
    parts = urlsplit(self.uri).path.split("/")
    if len(parts) > 3 and parts[2] == "functions":
        name = parts[3]
        return name if name.startswith("arn:") else f"arn:aws:lambda:{self.region}:{self.current_account}:function:{name}"
    return "*"


_original_statement_check = IAMPolicyStatement.is_action_permitted
_original_request_init = access_control.IAMRequestBase.__init__
_original_check_signature = access_control.IAMRequestBase.check_signature
_original_s3_check = s3_responses.S3Response._authenticate_and_authorize_s3_action
_original_delete_keys = s3_responses.S3Response._bucket_response_delete_keys
_original_bucket_post = s3_responses.S3Response._bucket_response_post


def install() -> None:
    IAMPolicyStatement.is_action_permitted = _statement_applies
    access_control.IAMRequestBase.check_action_permitted = _check_action_permitted
    access_control.IAMRequestBase.__init__ = _request_init
    access_control.IAMRequestBase.check_signature = _check_signature
    s3_responses.S3Response._authenticate_and_authorize_s3_action = _authorize_s3
    s3_responses.S3Response._bucket_response_delete_keys = _delete_keys
    s3_responses.S3Response._bucket_response_post = _bucket_post
    SecretsManagerResponse._determine_resource = _secret_resource
    LambdaResponse._determine_resource = _function_resource


def main() -> None:
    install()
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sys.stdout.write(f"{server.get_host_and_port()[1]}\n")
    sys.stdout.flush()
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
