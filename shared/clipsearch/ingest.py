"""The preprocessing use case: a batch of object events -> one immutable segment per dataset + one commit.

Order of work for a batch: fetch every created object (in parallel, using the ETag actually fetched so
a late, reordered event cannot bring back old content), claim a pending row per new version, embed the
claimed images together (chunk by chunk while later fetches continue), then per dataset write the
segment object first and commit second. Deletions are applied last. An object over the byte limit (by
the size its event announced, confirmed by a HEAD) is recorded as failed without being fetched.

Two batches carrying the same (key, etag) claim the same pending row. Commits of one dataset are
serialized on its row; the second commit sees that row no longer pending, commits nothing, and this
service rebuilds its segment without those vectors and commits again. So a vector never sits in two
live segments; the abandoned segment object is an orphan that compaction deletes after a grace period.

If a key is overwritten while another batch still embeds the older version, the older commit can
land last. Claims are ordered by id, so a claim older than its key's live row is refused (marked
deleted) instead of replacing it, and a commit retires the older pending claims of its keys. The
order of claims follows the order of GETs except when two batches interleave between their GET and
their claim: the older content can then become the live row, and reconciliation repairs it (the
catalog etag differs from the bucket's, so the key is announced again and its current version,
claimed anew, replaces the live row). A claim left pending by a crashed batch after its key changed
is retired by the next claim that finds the bucket's version already live (reconciliation announces
pending keys, so it is never left waiting).

A dataset deleted while its batch is in flight settles its images: they are logged and skipped.

Each embedded image also gets a WebP thumbnail, made from the image the encoder decoded (thumbnails.py)
and written while the chunk's neighbours are fetched and, like the segment, before the commit that makes
the image searchable; a removal deletes its key's thumbnail after the catalog forgets the image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256

import numpy as np

from clipsearch.datasets import (
    SOURCE_PATH_METADATA,
    decode_source_path,
    segment_key,
    storable_everywhere,
    thumbnail_key,
)
from clipsearch.errors import (
    ClipsearchError,
    DatasetNotFound,
    InvalidImage,
    ModelMismatch,
    ObjectNotFound,
    TransientError,
)
from clipsearch.events import EventKind, ObjectEvent, chunks
from clipsearch.ports import (
    BatchCommit,
    Catalog,
    ClaimedImage,
    Dataset,
    FailedImage,
    ImageEncoder,
    ImageInput,
    IndexedImage,
    NewImage,
    NewSegment,
    ObjectStore,
    StoredObject,
    VectorIndex,
)
from clipsearch.segments import FLAT, IndexSpec, SegmentVectors, new_segment_id
from clipsearch.thumbnails import LONGEST_SIDE as THUMBNAIL_SIDE
from clipsearch.thumbnails import THUMBNAIL_CONTENT_TYPE

logger = logging.getLogger(__name__)

DEFAULT_FETCH_WORKERS = 4
DEFAULT_EMBED_CHUNK = 64  # fewer restarts of the encoder's decode pipeline; 2 chunks of bytes in memory
DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024  # a whole object sits in memory, times workers and chunks
_COMMIT_ATTEMPTS = 5
# A version claimed this often sits in batches that keep failing; with no error logged, the function
# itself dies on that batch (memory, timeout), and its messages end in the dead-letter queue.
_REPEATED_CLAIMS = 3


@dataclass
class IngestReport:
    """What a batch did; `retry` names the messages to hand back to the queue, with the reason."""

    indexed: int = 0
    failed: int = 0
    duplicates: int = 0
    removed: int = 0
    skipped: int = 0
    segments: list[NewSegment] = field(default_factory=list)
    segment_bytes: list[int] = field(default_factory=list)
    retry: dict[str, str] = field(default_factory=dict)
    # Wall-clock seconds of each phase: waiting for fetches, claiming in the catalog, decoding and embedding,
    # writing segments and committing. Where a batch's time goes, as the function's metrics report it.
    fetch_wait_seconds: float = 0.0
    claim_seconds: float = 0.0
    embed_seconds: float = 0.0
    commit_seconds: float = 0.0

    def retry_messages(self, events: Sequence[ObjectEvent], reason: str) -> None:
        for event in events:
            self.retry.setdefault(event.message_id, reason)


@dataclass
class _DatasetBatch:
    """The images of one dataset embedded in this batch, waiting for their segment and commit."""

    dataset: Dataset
    rejection: str | None = None  # why none of its images may be embedded here (a model mismatch)
    gone: bool = False  # the dataset was deleted while this batch was in flight
    events: list[ObjectEvent] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    indexed: list[IndexedImage] = field(default_factory=list)
    failed: list[FailedImage] = field(default_factory=list)
    thumbnails: list[Future[None]] = field(default_factory=list)

    def drop(self, stale: frozenset[int]) -> None:
        keep = [position for position, image_id in enumerate(self.ids) if image_id not in stale]
        self.ids = [self.ids[position] for position in keep]
        self.vectors = [self.vectors[position] for position in keep]
        self.indexed = [image for image in self.indexed if image.id not in stale]
        self.failed = [image for image in self.failed if image.id not in stale]


@dataclass
class _Fetched:
    """An object version to claim: its bytes, or `refusal` when it was too large to fetch."""

    events: list[ObjectEvent]
    image: NewImage
    data: bytes | None
    refusal: str | None = None


class IngestService:
    def __init__(
        self,
        store: ObjectStore,
        catalog: Catalog,
        encoder: ImageEncoder,
        model_id: str,
        vector_index: VectorIndex,
        fetch_workers: int = DEFAULT_FETCH_WORKERS,
        embed_chunk: int = DEFAULT_EMBED_CHUNK,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        write_thumbnails: bool = True,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._encoder = encoder
        self._model_id = model_id
        self._vector_index = vector_index
        self._fetch_workers = fetch_workers
        self._embed_chunk = embed_chunk
        self._max_image_bytes = max_image_bytes
        self._write_thumbnails = write_thumbnails

    def ingest(self, events: Sequence[ObjectEvent]) -> IngestReport:
        report = IngestReport()
        ours = [event for event in events if self._is_ours(event, report)]
        created: dict[str, list[ObjectEvent]] = {}
        for event in ours:
            if event.kind is EventKind.CREATED:
                created.setdefault(event.key, []).append(event)
        batches = self._embed(created, report)
        started = time.perf_counter()
        for batch in batches.values():
            if batch.indexed or batch.failed:
                self._publish(batch, report)
        report.commit_seconds += time.perf_counter() - started
        for event in ours:
            if event.kind is EventKind.REMOVED:
                self._remove(event, report)
        return report

    def _is_ours(self, event: ObjectEvent, report: IngestReport) -> bool:
        if event.bucket != self._store.bucket:
            logger.warning("ignoring %r: bucket %r is not %r", event.key, event.bucket, self._store.bucket)
            report.skipped += 1
            return False
        return True

    def _embed(self, created: dict[str, list[ObjectEvent]], report: IngestReport) -> dict[str, _DatasetBatch]:
        """Fetches one chunk ahead of the one being embedded: S3 latency hides behind inference, and
        memory holds two chunks of image bytes, whatever the batch size."""
        batches: dict[str, _DatasetBatch] = {}
        key_chunks = list(chunks(list(created.items()), self._embed_chunk))
        with ThreadPoolExecutor(self._fetch_workers, thread_name_prefix="fetch") as pool:

            def fetch(chunk: Sequence[tuple[str, list[ObjectEvent]]]) -> list:
                return [(events, pool.submit(self._fetch, key, events)) for key, events in chunk]

            upcoming = fetch(key_chunks[0]) if key_chunks else []
            for position in range(len(key_chunks)):
                current = upcoming
                upcoming = fetch(key_chunks[position + 1]) if position + 1 < len(key_chunks) else []
                started = time.perf_counter()
                fetched = [item for item in (self._fetched(*pair, report) for pair in current) if item]
                fetched_at = time.perf_counter()
                claimed = self._claim(fetched, batches, report)
                claimed_at = time.perf_counter()
                thumbnail_side = THUMBNAIL_SIDE if self._write_thumbnails else None
                results = self._encoder.embed_images(
                    [ImageInput(item.image.key, item.data, thumbnail_side) for _, _, item in claimed]
                )
                report.fetch_wait_seconds += fetched_at - started
                report.claim_seconds += claimed_at - fetched_at
                report.embed_seconds += time.perf_counter() - claimed_at
                for (batch, claim, item), result in zip(claimed, results):
                    batch.events.extend(item.events)
                    if isinstance(result, InvalidImage):
                        batch.failed.append(FailedImage(claim.id, result.reason))
                    else:
                        batch.ids.append(claim.id)
                        batch.vectors.append(result.vector)
                        batch.indexed.append(IndexedImage(claim.id, result.width, result.height))
                        if self._write_thumbnails:
                            batch.thumbnails.append(pool.submit(self._put_thumbnail, item.image.key, result.thumbnail))
        return batches

    def _put_thumbnail(self, key: str, thumbnail: bytes | None) -> None:
        """An image the encoder could not shrink (rare, logged by it) just has no thumbnail; a storage
        fault fails the batch's commit, to be retried. An image key within 7 bytes of the key limits has no
        thumbnail either: its thumbnail's key would be refused every time, and the batch with it retried."""
        destination = thumbnail_key(key)
        if thumbnail is None:
            return
        if not storable_everywhere(destination):
            logger.warning("no thumbnail for %r: its key would be too long for the object store", key)
            return
        self._store.put(destination, thumbnail, content_type=THUMBNAIL_CONTENT_TYPE)

    def _fetch(self, key: str, events: list[ObjectEvent]) -> _Fetched:
        """GETs the object unless it is too large; a size the events lack or exceed is checked by HEAD."""
        if any(event.size is None or event.size > self._max_image_bytes for event in events):
            current = self._store.head(key)
            if current is None:
                raise ObjectNotFound(key)
            if current.size > self._max_image_bytes:
                refusal = (f"the object is {current.size} bytes, over the ingest limit of "
                           f"{self._max_image_bytes} bytes; not fetched")
                image = NewImage(events[0].bucket, key, current.etag, None, None, current.size)
                return _Fetched(events, image, None, refusal)
        stored = self._store.get(key)
        return _Fetched(events, _new_image(events[0].bucket, stored), stored.data)

    def _fetched(
        self, events: list[ObjectEvent], future: Future[_Fetched], report: IngestReport
    ) -> _Fetched | None:
        try:
            return future.result()
        except ObjectNotFound:
            logger.info("skipping %r: gone from the bucket (its removal event follows)", events[0].key)
            report.skipped += 1
        except TransientError as error:
            logger.warning("will retry %r: %s", events[0].key, error)
            report.retry_messages(events, str(error))
        return None

    def _claim(
        self, fetched: list[_Fetched], batches: dict[str, _DatasetBatch], report: IngestReport
    ) -> list[tuple[_DatasetBatch, ClaimedImage, _Fetched]]:
        by_dataset: dict[str, list[_Fetched]] = {}
        for item in fetched:
            by_dataset.setdefault(item.events[0].dataset, []).append(item)
        claimed = []
        for name, items in by_dataset.items():
            batch = batches.get(name)
            if batch is not None and batch.gone:
                _skip_deleted(name, len(items), report)
                continue
            try:
                if batch is None:
                    batch = batches[name] = self._open_batch(name)
                claims = self._catalog.claim_images(batch.dataset.id, [item.image for item in items])
            except DatasetNotFound:
                if batch is not None:
                    batch.gone = True
                _skip_deleted(name, len(items), report)
                continue
            except ClipsearchError as error:
                logger.warning("will retry %d images of %r: %s", len(items), name, error)
                report.retry_messages([event for item in items for event in item.events], str(error))
                continue
            for item, claim in zip(items, claims):
                if claim is None:
                    report.duplicates += 1
                    continue
                if claim.attempts >= _REPEATED_CLAIMS:
                    logger.warning("%r (etag %s) claimed %d times: the batches carrying it keep failing",
                                   claim.key, claim.etag, claim.attempts)
                if batch.rejection or item.refusal:
                    batch.events.extend(item.events)
                    batch.failed.append(FailedImage(claim.id, batch.rejection or item.refusal))
                else:
                    claimed.append((batch, claim, item))
        return claimed

    def _open_batch(self, name: str) -> _DatasetBatch:
        try:
            return _DatasetBatch(self._catalog.ensure_dataset(name, self._model_id))
        except ModelMismatch as error:
            logger.error("not embedding images of %r: %s", name, error)
            return _DatasetBatch(self._catalog.get_dataset(name), rejection=str(error))

    def _publish(self, batch: _DatasetBatch, report: IngestReport) -> None:
        name = batch.dataset.name
        try:
            for written in batch.thumbnails:  # objects first: the thumbnails are in the bucket before the commit
                written.result()
            committed = self._commit(batch)
        except DatasetNotFound:
            _skip_deleted(name, len(batch.indexed) + len(batch.failed), report)
            return
        except ClipsearchError as error:
            logger.warning("will retry the batch of %r: %s", name, error)
            report.retry_messages(batch.events, str(error))
            return
        if committed is None:
            logger.info("every image of %r was settled by a concurrent batch", name)
            return
        outcome, segment, size = committed
        report.indexed += len(batch.indexed)
        report.failed += len(batch.failed)
        if segment is not None:
            report.segments.append(segment)
            report.segment_bytes.append(size)
        logger.info("dataset %r at version %s: %d indexed, %d failed", name, outcome.index_version,
                    len(batch.indexed), len(batch.failed))

    def _commit(self, batch: _DatasetBatch) -> tuple[BatchCommit, NewSegment | None, int] | None:
        """Writes and commits the batch's segment, again without the images a concurrent batch settled;
        None when that leaves nothing to commit."""
        for _ in range(_COMMIT_ATTEMPTS):
            if not (batch.indexed or batch.failed):
                return None
            segment, size = self._write_segment(batch)
            try:
                outcome = self._catalog.commit_batch(batch.dataset.id, segment, batch.indexed, batch.failed)
            except DatasetNotFound:
                self._discard(segment)
                raise
            if not outcome.stale_ids:
                return outcome, segment, size
            logger.info("%d images of %r were settled by a concurrent batch; recommitting without them",
                        len(outcome.stale_ids), batch.dataset.name)
            batch.drop(outcome.stale_ids)
        raise TransientError(f"dataset {batch.dataset.name!r}: concurrent batches kept claiming the same images")

    def _discard(self, segment: NewSegment | None) -> None:
        """Compaction cleans orphans only under datasets it knows: a deleted dataset's are removed here."""
        if segment is None:
            return
        try:
            self._store.delete_many([segment.object_key])
        except TransientError as error:
            logger.warning("leaving orphan segment %s: %s", segment.object_key, error)

    def _write_segment(self, batch: _DatasetBatch) -> tuple[NewSegment | None, int]:
        """Object first: the segment is in the bucket before any row names it."""
        if not batch.ids:
            return None, 0
        content = SegmentVectors(np.array(batch.ids, np.int64), np.stack(batch.vectors))
        data = self._vector_index.build(content, IndexSpec(FLAT))
        segment_id = new_segment_id()
        key = segment_key(batch.dataset.name, segment_id)
        self._store.put(key, data, content_type="application/octet-stream")
        return NewSegment(segment_id, key, len(batch.ids), FLAT), len(data)

    def _remove(self, event: ObjectEvent, report: IngestReport) -> None:
        try:
            # A removal event can arrive after the key was uploaded again: keep that version.
            current = self._store.head(event.key)
            report.removed += self._catalog.remove_images(
                event.dataset, event.key, current.etag if current else None
            )
            if current is None and self._write_thumbnails:
                self._store.delete_many([thumbnail_key(event.key)])
        except TransientError as error:
            logger.warning("will retry the removal of %r: %s", event.key, error)
            report.retry_messages([event], str(error))


def _skip_deleted(dataset: str, count: int, report: IngestReport) -> None:
    """Settled, not retried: the images went with their dataset."""
    logger.warning("skipping %d images of %r: the dataset was deleted while this batch ran", count, dataset)
    report.skipped += count


def _source_path(stored: StoredObject) -> str | None:
    metadata = stored.metadata.get(SOURCE_PATH_METADATA)
    return None if metadata is None else decode_source_path(metadata)


def _new_image(bucket: str, stored: StoredObject) -> NewImage:
    return NewImage(
        bucket=bucket,
        key=stored.key,
        etag=stored.etag,
        source_path=_source_path(stored),
        sha256=sha256(stored.data).hexdigest(),
        byte_size=len(stored.data),
    )
