"""`clipsearch ingest` and `clipsearch sync`: put a folder's images in the bucket and wait until indexed."""

from __future__ import annotations

import argparse
import hashlib
import mimetypes
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from tqdm import tqdm

from clipsearch.datasets import IMAGE_SUFFIXES, SOURCE_PATH_METADATA, dataset_prefix, has_image_suffix
from clipsearch.errors import ClipsearchError
from clipsearch_tools.cli.output import emit_json, note, random_weights_note
from clipsearch_tools.client import ApiError, ClipsearchClient
from clipsearch_tools.object_keys import MappedKey, map_file_key

_POLL_SECONDS = 1.0
# Each poll is a datasets-function invocation with its catalog counts, on the cores that index. Far from done, the
# wait polls less often: a quarter of the time the indexing rate so far says is left, at most this long.
_MAX_POLL_SECONDS = 5.0
# Answers that say "not now" (throttled, the database or a function unavailable): waiting goes on through them.
_RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


@dataclass
class IngestResult:
    dataset: str
    found: int = 0
    uploaded: int = 0
    skipped: int = 0
    not_images: int = 0
    refused: list[dict] = field(default_factory=list)
    indexed: int = 0
    pending: int = 0
    failed: list[dict] = field(default_factory=list)
    failures_not_listed: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _LocalImage:
    path: Path
    key: str
    source_path_metadata: str | None
    md5: str


@dataclass
class _Folder:
    """What a folder holds: its images with their keys, the images refused a key, and its other files."""

    images: list[_LocalImage] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    not_images: int = 0


def ingest(args: argparse.Namespace, client: ClipsearchClient) -> int:
    started = time.monotonic()
    folder = Path(args.dir)
    if not folder.is_dir():
        raise ClipsearchError(f"not a folder: {folder}")
    found = _local_images(folder, args.dataset)
    images = found.images
    if not images and not found.refused:
        raise ClipsearchError(f"no images under {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    result = IngestResult(args.dataset, found=len(images) + len(found.refused), not_images=found.not_images,
                          refused=found.refused)
    for image in images:
        if image.source_path_metadata is None:
            note(f"{image.path}: its path is too long for S3 metadata: uploaded without it, search results "
                 f"show its key {image.key}")
    before = _counts(client, args.dataset)
    # Only images are ever indexed: any other object under the prefix must not count as awaited.
    stored = {item.key: item.etag for item in client.object_store().list(dataset_prefix(args.dataset))
              if has_image_suffix(item.key)}
    changed = [image for image in images if stored.get(image.key) != image.md5]
    result.skipped = len(images) - len(changed)
    _upload(client, changed, args.workers)
    result.uploaded = len(changed)
    keys = {image.key: image.path for image in images}
    summary = None
    if not args.no_wait:
        expected = len({*stored, *keys})  # every image of the dataset in the bucket now
        replaced = sum(image.key in stored for image in changed)
        summary = _wait_indexed(client, args.dataset, expected, before if replaced else None, args.timeout)
        _fill(result, summary, keys)
    result.seconds = round(time.monotonic() - started, 1)
    _report(args, client, result, summary)
    return 3 if result.failed or result.refused else 0


def sync(args: argparse.Namespace, client: ClipsearchClient) -> int:
    """Reconciles one dataset (announces what the catalog lacks), then waits until it is indexed."""
    from clipsearch_tools.cli.maintenance import reconcile

    report = reconcile(client, args.dataset)
    summary = _wait_indexed(client, args.dataset, report["scanned"], None, args.timeout)
    counts = summary["counts"]
    failures = summary.get("recent_failures", [])
    document = {**report, "indexed": counts.get("indexed", 0), "pending": counts.get("pending", 0),
                "failed": [{"key": failure["key"], "reason": failure["reason"]} for failure in failures],
                "failures_not_listed": _failures_not_listed(summary)}
    if args.json:
        emit_json(document)
    else:
        print(f"dataset {args.dataset}: {report['scanned']} images in the bucket, {report['enqueued']} queued "
              f"for indexing, {report['marked_deleted']} gone from the bucket marked deleted; "
              f"now {document['indexed']} indexed, {counts.get('failed', 0)} failed")
        for failure in document["failed"]:
            print(f"  failed: {failure['key']}: {failure['reason']}")
        _print_not_listed(document["failures_not_listed"])
    return 0


def _local_images(folder: Path, dataset: str) -> _Folder:
    """The folder's images with their keys (clipsearch_tools.object_keys), the ones refused a key, and how many
    other (not hidden) files it holds: neither of those is uploaded."""
    found = _Folder()
    mapped_images = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if not has_image_suffix(path.name):
            found.not_images += 1
            continue
        relative = path.relative_to(folder).as_posix()
        mapped = map_file_key(dataset, relative, str(path.resolve()))
        if isinstance(mapped, MappedKey):
            mapped_images.append((mapped.key != dataset_prefix(dataset) + relative, path, mapped))
        else:
            found.refused.append({"path": _printable(path), "reason": mapped.reason})
    owners: dict[str, Path] = {}
    # Of two names that differ only in Unicode normalization, the one already in NFC keeps the key.
    for _, path, mapped in sorted(mapped_images, key=lambda item: item[:2]):
        if mapped.key in owners:
            found.refused.append({"path": _printable(path), "reason": f"its key {mapped.key} is already that of "
                                  f"{_printable(owners[mapped.key])} (the names differ only in Unicode "
                                  "normalization)"})
            continue
        owners[mapped.key] = path
        found.images.append(_LocalImage(path, mapped.key, mapped.source_path_metadata, _md5(path)))
    return found


def _printable(path: Path) -> str:
    """`path` on one line: bytes of a name that is not UTF-8 as U+FFFD, control characters escaped (`\\n`)."""
    text = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)


def _md5(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "md5").hexdigest()


def _upload(client: ClipsearchClient, images: list[_LocalImage], workers: int) -> None:
    if not images:
        return

    def put(image: _LocalImage) -> None:
        content_type = mimetypes.guess_type(image.path.name)[0] or "application/octet-stream"
        metadata = {} if image.source_path_metadata is None else {SOURCE_PATH_METADATA: image.source_path_metadata}
        client.s3.put_object(
            Bucket=client.target.bucket, Key=image.key, Body=image.path.read_bytes(),
            ContentType=content_type, Metadata=metadata,
        )

    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(images), desc="uploading", unit="img", disable=None, leave=False
    ) as progress:
        futures = {pool.submit(put, image): image for image in images}
        for future in as_completed(futures):
            try:
                future.result()
            except (BotoCoreError, ClientError, OSError) as error:
                for pending in futures:
                    pending.cancel()
                raise ClipsearchError(f"upload of {futures[future].path} failed: {error}") from None
            progress.update()


def _counts(client: ClipsearchClient, dataset: str) -> dict | None:
    try:
        return client.get_dataset(dataset)
    except ApiError as error:
        if error.code == "dataset_not_found":
            return None
        raise


def _wait_indexed(client: ClipsearchClient, dataset: str, expected: int, before: dict | None, timeout: float) -> dict:
    """Polls the dataset until `expected` images are indexed or failed and none is pending.

    `before` (the dataset before replacing images) also requires the index to have moved on, since
    replaced images keep their count while they are re-indexed.
    """
    deadline = time.monotonic() + timeout
    unavailable_noted = False
    first_seen: tuple[float, int] | None = None  # (when, images done) at the first answer
    with tqdm(total=expected, desc="indexing", unit="img", disable=None, leave=False) as progress:
        while True:
            try:
                summary = _counts(client, dataset)
            except ApiError as error:
                if error.status not in _RETRYABLE_STATUSES or time.monotonic() > deadline:
                    raise
                if not unavailable_noted:
                    note(f"the API answered {error.status} ({error}) while waiting for dataset {dataset!r}: "
                         "still waiting")
                    unavailable_noted = True
                time.sleep(_POLL_SECONDS)
                continue
            counts = (summary or {}).get("counts", {})
            done = counts.get("indexed", 0) + counts.get("failed", 0)
            progress.n = min(done, expected)
            progress.refresh()
            moved = before is None or summary is None or (
                summary["index_version"] != before["index_version"]
                or counts.get("failed", 0) != before["counts"].get("failed", 0)
            )
            if summary is not None and done >= expected and counts.get("pending", 0) == 0 and moved:
                return summary
            if expected == 0:
                return summary or {"counts": {}, "recent_failures": []}
            if time.monotonic() > deadline:
                raise ClipsearchError(
                    f"timed out after {timeout:.0f} s waiting for dataset {dataset!r} to be indexed: "
                    f"{counts.get('indexed', 0)} indexed, {counts.get('pending', 0)} pending, "
                    f"{counts.get('failed', 0)} failed of {expected} (see `clipsearch local status`)"
                )
            if first_seen is None:
                first_seen = (time.monotonic(), done)
            time.sleep(_poll_interval(first_seen, time.monotonic(), done, expected))


def _poll_interval(first_seen: tuple[float, int], now: float, done: int, expected: int) -> float:
    """Seconds until the next poll: 1 s near the end (or before any progress), longer while much is left."""
    since, done_then = first_seen
    if done <= done_then or now <= since:
        return _POLL_SECONDS
    seconds_left = (expected - done) / ((done - done_then) / (now - since))
    return min(_MAX_POLL_SECONDS, max(_POLL_SECONDS, seconds_left / 4))


def _fill(result: IngestResult, summary: dict, keys: dict[str, Path]) -> None:
    """This folder's failures among the dataset's recent ones (other folders and runs may add to the dataset)."""
    counts = summary.get("counts", {})
    result.indexed = counts.get("indexed", 0)
    result.pending = counts.get("pending", 0)
    result.failed = [
        {"path": str(keys[failure["key"]]), "key": failure["key"], "reason": failure["reason"]}
        for failure in summary.get("recent_failures", []) if failure["key"] in keys
    ]
    result.failures_not_listed = _failures_not_listed(summary)


def _failures_not_listed(summary: dict) -> int:
    """Failed images of the dataset beyond the most recent ones the API lists."""
    return max(0, summary.get("counts", {}).get("failed", 0) - len(summary.get("recent_failures", [])))


def _print_not_listed(count: int) -> None:
    if count:
        print(f"  ... and {count} more failed images in the dataset, not listed (the API lists the most recent)")


def _report(args: argparse.Namespace, client: ClipsearchClient, result: IngestResult, summary: dict | None) -> None:
    if summary and summary.get("model") and client.model_has_random_weights(summary["model"]):
        note(random_weights_note(summary["model"]))
    if args.json:
        emit_json({"dataset": result.dataset, "found": result.found, "uploaded": result.uploaded,
                   "skipped": result.skipped, "skipped_not_images": result.not_images,
                   "refused": result.refused,
                   "indexed": result.indexed, "pending": result.pending,
                   "failed": [{"path": item["path"], "reason": item["reason"]} for item in result.failed],
                   "failures_not_listed": result.failures_not_listed,
                   "seconds": result.seconds, "model": (summary or {}).get("model")})
        return
    not_images = f", {result.not_images} not an image (skipped)" if result.not_images else ""
    refused = f", {len(result.refused)} whose name cannot be stored (not uploaded)" if result.refused else ""
    print(f"dataset {result.dataset}: {result.found} images found, {result.uploaded} uploaded, "
          f"{result.skipped} unchanged (skipped){not_images}{refused}")
    for item in result.refused:
        print(f"  not uploaded: {item['path']}: {item['reason']}")
    if summary is not None:
        print(f"indexed: {result.indexed} images in the dataset, {len(result.failed)} of this folder failed "
              f"({result.seconds:.1f} s)")
        for failure in result.failed:
            print(f"  failed: {failure['path']}: {failure['reason']}")
        _print_not_listed(result.failures_not_listed)
