"""S3ObjectStore: one bucket over a botocore S3 client, with S3 errors translated into domain errors."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import urllib3
from botocore.exceptions import BotoCoreError, ClientError
from botocore.httpsession import get_cert_path

from clipsearch.errors import ObjectNotFound, TransientError
from clipsearch.ports import ObjectInfo, StoredObject

_MISSING = {"NoSuchKey", "404", "NotFound"}
_DELETE_BATCH = 1000  # S3's DeleteObjects limit
# Big objects (segments) come down as parallel ranged GETs: S3 gives ~80-100 MB/s per connection, so a
# 550 MB segment needs several connections at once. The object is cut into as many equal parts as there are
# connections (at least 8 MiB each) rather than boto3's fixed 8 MiB parts: a 550 MB segment is 8 requests,
# not 70, with no lone last part; a store that reads the whole object for every ranged GET (moto 5.2.5
# does) pays 8 reads, not 70 (a 554 MB object from moto on this 2-core machine at load 15: 147 s with
# 8 MiB parts, 26 s with 64 MiB parts, 9 s as one GET).
_DOWNLOAD_CONNECTIONS = 8
_MIN_PART_BYTES = 8 * 2**20
# A part's body is written to the file as it streams in, this much at a time: memory stays bounded.
_STREAM_CHUNK_BYTES = 2**20
# botocore retries a failed request, not a body that breaks off while it streams: a part is fetched again
# from its start this many times in all (as s3transfer did).
_PART_ATTEMPTS = 5
# Ranged reads (get_range): presigned URLs valid 15 minutes, reused for 10; connections, retries, timeouts.
_PRESIGNED_EXPIRY_SECONDS = 900
_PRESIGNED_REUSE_SECONDS = 600
_RANGE_CONNECTIONS = 16
_RANGE_RETRIES = 4
_RANGE_CONNECT_TIMEOUT_SECONDS = 5
_RANGE_READ_TIMEOUT_SECONDS = 20


class S3ObjectStore:
    def __init__(self, client, bucket: str) -> None:
        self._client = client
        self.bucket = bucket
        self._presigned: dict[str, tuple[str, float]] = {}  # key -> (presigned GET URL, when it was signed)
        self._presigned_lock = threading.Lock()
        self._pool: urllib3.PoolManager | None = None

    def get(self, key: str) -> StoredObject:
        with _translated(key):
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            data = response["Body"].read()
        return StoredObject(
            key=key,
            etag=_etag(response["ETag"]),
            data=data,
            metadata=response.get("Metadata", {}),
            content_type=response.get("ContentType"),
        )

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with _translated(key):
                response = self._client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFound:
            return None
        return ObjectInfo(key, _etag(response["ETag"]), response["ContentLength"], response.get("LastModified"))

    def put(
        self,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        extra = {"ContentType": content_type} if content_type else {}
        with _translated(key):
            response = self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, Metadata=dict(metadata or {}), **extra
            )
        return _etag(response["ETag"])

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object; TransientError if the object is shorter.

        A plain GET of a presigned URL (kept for a few minutes per key) over a urllib3 pool, not a botocore
        call: a cold query fetches ~25 small ranges per segment, and botocore's request pipeline costs
        ~4.4 ms of CPU per ranged GET against ~1.4 ms this way (57 KB ranges from SeaweedFS, load 8)."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        for fresh in (False, True):
            try:
                response = self._range_pool().request(
                    "GET", self._presigned_get(key, fresh), headers=headers, preload_content=True)
            except urllib3.exceptions.HTTPError as error:
                # Not str(error): urllib3 quotes the presigned URL, whose query holds the signature and token.
                reason = getattr(error, "reason", None) or error
                raise TransientError(
                    f"object store unreachable for {key!r}: {type(reason).__name__}"
                ) from None
            if response.status == 403 and not fresh:  # the URL expired (or its credentials rotated): sign again
                continue
            break
        if response.status == 404:
            raise ObjectNotFound(key)
        if response.status not in (200, 206):
            raise TransientError(f"object store error on {key!r}: HTTP {response.status}")
        data = response.data
        if response.status == 200:  # a store that ignored the range sent the whole object
            data = data[start:end]
        if len(data) != end - start:
            raise TransientError(f"{key!r}: asked bytes {start}-{end - 1}, got {len(data)} bytes")
        return data

    def _presigned_get(self, key: str, fresh: bool) -> str:
        now = time.monotonic()
        with self._presigned_lock:
            url, signed_at = self._presigned.get(key, ("", -_PRESIGNED_REUSE_SECONDS))
            if fresh or now - signed_at >= _PRESIGNED_REUSE_SECONDS:
                url = self.presigned_url(key, _PRESIGNED_EXPIRY_SECONDS)
                self._presigned[key] = (url, now)
            return url

    def _range_pool(self) -> urllib3.PoolManager:
        with self._presigned_lock:
            if self._pool is None:
                self._pool = urllib3.PoolManager(
                    maxsize=_RANGE_CONNECTIONS, ca_certs=get_cert_path(True),
                    retries=urllib3.Retry(total=_RANGE_RETRIES, backoff_factor=0.05,
                                          status_forcelist=(500, 502, 503, 504), allowed_methods=["GET"]),
                    timeout=urllib3.Timeout(connect=_RANGE_CONNECT_TIMEOUT_SECONDS, read=_RANGE_READ_TIMEOUT_SECONDS),
                )
            return self._pool

    def download_file(self, key: str, destination: Path) -> None:
        """The object into `destination` as equal parallel ranged GETs, each streamed to its place in the
        file; on failure no file is left."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        info = self.head(key)
        if info is None:
            raise ObjectNotFound(key)
        part_bytes = max(_MIN_PART_BYTES, -(-info.size // _DOWNLOAD_CONNECTIONS))
        parts = [(start, min(start + part_bytes, info.size)) for start in range(0, info.size, part_bytes)]
        descriptor = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(descriptor, info.size)
            if not parts:  # an empty object: the empty file is all of it
                pass
            elif len(parts) == 1:
                self._download_part(key, descriptor, *parts[0])
            else:
                with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="s3-part") as pool:
                    for done in [pool.submit(self._download_part, key, descriptor, *part) for part in parts]:
                        done.result()
        except BaseException:
            os.close(descriptor)
            destination.unlink(missing_ok=True)
            raise
        os.close(descriptor)

    def _download_part(self, key: str, descriptor: int, start: int, end: int) -> None:
        for attempt in range(1, _PART_ATTEMPTS + 1):
            try:
                with _translated(key):
                    response = self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
                    position = start
                    for chunk in response["Body"].iter_chunks(_STREAM_CHUNK_BYTES):
                        os.pwrite(descriptor, chunk, position)
                        position += len(chunk)
                if position != end:
                    raise TransientError(f"{key!r}: bytes {start}-{end - 1} ended at {position}")
                return
            except TransientError as error:
                if attempt == _PART_ATTEMPTS or not _broke_off(error):
                    raise

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]
            with _translated(batch[0]["Key"]):
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise TransientError(f"could not delete {first['Key']}: {first.get('Message')}")

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        with _translated(prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"], _etag(item["ETag"]), item["Size"], item.get("LastModified"))

    def presigned_url(self, key: str, expires_seconds: int = 3600) -> str:
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_seconds
        )


def _broke_off(error: TransientError) -> bool:
    """True when a body stopped short or its stream failed, which a new request may not repeat."""
    cause = error.__cause__
    return cause is None or isinstance(cause, BotoCoreError)


def _etag(raw: str) -> str:
    return raw.strip('"')


class _translated:
    """Turns botocore failures into ObjectNotFound or TransientError naming the key."""

    def __init__(self, key: str) -> None:
        self._key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise ObjectNotFound(self._key) from exc
            raise TransientError(f"object store error on {self._key!r}: {code or exc}") from exc
        if isinstance(exc, BotoCoreError):
            raise TransientError(f"object store unreachable for {self._key!r}: {exc}") from exc
        return False
