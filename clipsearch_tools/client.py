"""The CLI's view of a clipsearch stack: its HTTP API (SigV4-signed when deployed) and its bucket."""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from botocore.exceptions import BotoCoreError, ClientError

from clipsearch.aws import aws_client, default_credentials
from clipsearch.errors import ClipsearchError
from clipsearch_tools.local.control import running_state
from clipsearch_tools.local.state import StackState, stack_home

API_URL_ENV = "CLIPSEARCH_API_URL"
BUCKET_ENV = "CLIPSEARCH_BUCKET"
_REQUEST_TIMEOUT = 300  # the first search of a fresh stack downloads and loads the model
# The weight of an excluded text (--not): the example of issue 9; stronger pushes out results that merely
# share the query's subject.
EXCLUDE_WEIGHT = -0.5
_EXECUTE_API_HOST = re.compile(r"^[a-z0-9]+\.execute-api\.([a-z0-9-]+)\.amazonaws\.com")


class ApiError(ClipsearchError):
    """The API answered with an error; `message` is what it said."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class StackUnreachable(ClipsearchError):
    """No stack to talk to: the local stack is not running, or the API does not answer."""


class ApiAnswer(NamedTuple):
    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True)
class Target:
    """Where the stack is: the API URL, the bucket, and how to reach and sign for each."""

    api_url: str
    bucket: str
    region: str
    s3_endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    sign_requests: bool = False
    local: StackState | None = None


def resolve_target(
    api_url: str | None = None, bucket: str | None = None, home: str | None = None, needs_bucket: bool = True,
) -> Target:
    """A deployed stack from --api-url/--bucket (or their env vars), else the running local stack.

    `needs_bucket=False`: for callers that only use the HTTP API (the web page's proxy)."""
    api_url = api_url or os.environ.get(API_URL_ENV)
    bucket = bucket or os.environ.get(BUCKET_ENV) or ""
    if api_url:
        if not bucket and needs_bucket:
            raise StackUnreachable(f"a deployed stack needs its bucket too: --bucket or {BUCKET_ENV}")
        found = _EXECUTE_API_HOST.match(urllib.parse.urlsplit(api_url).netloc)
        region = (found.group(1) if found else None) or os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION") or "us-east-1"
        return Target(api_url.rstrip("/"), bucket, region, sign_requests=found is not None)
    state = running_state(stack_home(home))
    if state is None or state.status != "ready":
        raise StackUnreachable(
            "no local stack is running (start it with `clipsearch local up`), "
            "or give a deployed stack with --api-url and --bucket"
        )
    return Target(
        state.api_url, state.bucket, state.region, state.s3_endpoint_url,
        state.access_key_id, state.secret_access_key, local=state,
    )


class ClipsearchClient:
    def __init__(self, target: Target) -> None:
        self.target = target

    # --- HTTP API ---------------------------------------------------------------------------------

    def list_datasets(self) -> list[dict]:
        return self._request("GET", "/datasets")["datasets"]

    def get_dataset(self, name: str) -> dict:
        return self._request("GET", f"/datasets/{_segment(name)}")

    def delete_dataset(self, name: str) -> dict:
        return self._request("DELETE", f"/datasets/{_segment(name)}")

    def search_text(
        self, dataset: str, query: str, k: int, refinements: Mapping[str, object] | None = None,
        exclude: Sequence[str] = (),
    ) -> dict:
        """`refinements`: offset, min_score, autocut, prefix, since, until (None values left out);
        each text in `exclude` becomes a term of weight EXCLUDE_WEIGHT."""
        body: dict = {"k": k, **_present(refinements)}
        if exclude:
            body["terms"] = [{"text": query, "weight": 1}, *_excluded(exclude)]
        else:
            body["query"] = query
        return self._request("POST", f"/datasets/{_segment(dataset)}/search/text", body)

    def search_image(
        self, dataset: str, image: bytes, content_type: str, k: int, refinements: Mapping[str, object] | None = None,
        exclude: Sequence[str] = (),
    ) -> dict:
        if exclude:  # terms mix an image with texts: the JSON body of the text route
            terms = [{"image_base64": base64.b64encode(image).decode("ascii"), "weight": 1}, *_excluded(exclude)]
            body = {"terms": terms, "k": k, **_present(refinements)}
            return self._request("POST", f"/datasets/{_segment(dataset)}/search/text", body)
        query = urllib.parse.urlencode({"k": k, **{
            name: ("true" if value is True else value) for name, value in _present(refinements).items()
        }})
        return self._request("POST", f"/datasets/{_segment(dataset)}/search/image?{query}", raw=(image, content_type))

    def duplicates(self, dataset: str, min_score: float) -> dict:
        query = urllib.parse.urlencode({"min_score": min_score})
        return self._request("GET", f"/datasets/{_segment(dataset)}/duplicates?{query}")

    def search_stored_image(self, dataset: str, key: str, k: int) -> dict:
        return self._request("POST", f"/datasets/{_segment(dataset)}/search/image", {"key": key, "k": k})

    def _request(self, method: str, path: str, body: dict | None = None, raw: tuple[bytes, str] | None = None):
        data, content_type = None, None
        if body is not None:
            data, content_type = json.dumps(body).encode(), "application/json"
        elif raw is not None:
            data, content_type = raw
        answer = self.send(method, path, data, content_type)
        if answer.status >= 400:
            raise _api_error(answer.status, answer.body)
        return json.loads(answer.body or b"null")

    def send(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None) -> ApiAnswer:
        """One request to the API (signed for a deployed stack) and its answer as it came, errors included."""
        url = self.target.api_url + path
        headers = {"accept": "application/json"}
        if content_type is not None:
            headers["content-type"] = content_type
        if self.target.sign_requests:
            headers = self._signed_headers(method, url, data, headers)
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT) as response:
                return ApiAnswer(response.status, response.headers.get("content-type", ""), response.read())
        except urllib.error.HTTPError as error:
            return ApiAnswer(error.code, error.headers.get("content-type", ""), error.read())
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise StackUnreachable(f"cannot reach the clipsearch API at {self.target.api_url}: {reason}") from None

    def _signed_headers(self, method: str, url: str, data: bytes | None, headers: dict) -> dict:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        credentials = default_credentials()
        if credentials is None:
            raise StackUnreachable("the deployed API uses IAM auth: configure AWS credentials to sign requests")
        request = AWSRequest(method=method, url=url, data=data, headers=headers)
        SigV4Auth(credentials, "execute-api", self.target.region).add_auth(request)
        return dict(request.headers.items())

    # --- bucket -----------------------------------------------------------------------------------

    @cached_property
    def s3(self):
        target = self.target
        return aws_client("s3", target.region, target.s3_endpoint_url, target.access_key_id, target.secret_access_key)

    def object_store(self):
        from clipsearch.adapters.s3_store import S3ObjectStore

        return S3ObjectStore(self.s3, self.target.bucket)

    def model_has_random_weights(self, model_id: str) -> bool:
        """Whether the model's manifest says its weights are random (False when it cannot be read)."""
        local = self.target.local
        if local is not None and local.model_id == model_id:
            return local.model_random_weights
        try:
            manifest = self.s3.get_object(Bucket=self.target.bucket, Key=f"models/{model_id}/manifest.json")
            return bool(json.loads(manifest["Body"].read()).get("random_weights"))
        except (BotoCoreError, ClientError, ValueError):  # only a label: a manifest we cannot read must not fail the search
            return model_id.startswith("random-")


def _present(refinements: Mapping[str, object] | None) -> dict:
    # `is`, not `in`: 0 == False, and --min-score 0 is a value to send.
    return {name: value for name, value in (refinements or {}).items() if value is not None and value is not False}


def _excluded(texts: Sequence[str]) -> list[dict]:
    return [{"text": text, "weight": EXCLUDE_WEIGHT} for text in texts]


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _api_error(status: int, payload: bytes) -> ApiError:
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return ApiError(status, str(error.get("code", "error")), str(error.get("message", "")))
    if isinstance(body, dict) and "message" in body:  # API Gateway's own errors (auth, no route)
        return ApiError(status, "gateway", str(body["message"]))
    text = payload.decode("utf-8", errors="replace").strip().splitlines()
    return ApiError(status, "http_error", f"HTTP {status}: {text[0] if text else 'no body'}")


def read_image(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ClipsearchError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise ClipsearchError(f"{path} is a directory, not an image file") from None
    except OSError as error:
        raise ClipsearchError(f"cannot read {path}: {error.strerror}") from None
