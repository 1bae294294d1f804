"""The dataset use case behind the API: list datasets, describe one, delete one asynchronously with all its objects."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from itertools import islice

from clipsearch.datasets import INDEXES_PREFIX, dataset_prefix, thumbnails_prefix
from clipsearch.errors import DatasetNotFound, InvalidRequest
from clipsearch.ports import DatasetSummary, DeletionProgress, DeletionTask, MessageQueue, ObjectStore, SearchCatalog

logger = logging.getLogger(__name__)

OBJECT_PAGE = 1000  # S3's DeleteObjects takes at most 1000 keys
ROW_PAGE = 10_000  # image rows removed per catalog transaction: short transactions, short lock waits
# A worker renews its lease with every page (a page takes about a second): a worker that died is taken over
# this long after its last page, by its message coming back or by the scheduled sweep.
LEASE_SECONDS = 120
# The sweep leaves alone a deletion younger than this: its message is still on its way to a worker.
STALLED_AFTER = timedelta(minutes=5)


class DeletionOutcome(Enum):
    FINISHED = "finished"  # objects and rows gone
    UNFINISHED = "unfinished"  # out of time: the caller queues the task again
    SKIPPED = "skipped"  # another worker holds the lease, or the dataset is already gone


def task_message(task: DeletionTask) -> str:
    return json.dumps({"dataset": task.dataset, "dataset_id": task.dataset_id})


def parse_task_message(body: str) -> DeletionTask:
    try:
        fields = json.loads(body)
        return DeletionTask(str(fields["dataset"]), int(fields["dataset_id"]))
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest(f"not a dataset deletion task: {body[:200]!r}") from None


class DatasetService:
    def __init__(self, catalog: SearchCatalog, store: ObjectStore, deletion_queue: MessageQueue) -> None:
        self._catalog = catalog
        self._store = store
        self._deletion_queue = deletion_queue

    def list(self) -> Sequence[DatasetSummary]:
        return self._catalog.list_datasets()

    def describe(self, name: str, failure_limit: int = 20) -> DatasetSummary:
        """The catalog rejects an invalid name (InvalidDatasetName) as it reads the row."""
        return self._catalog.summarize_dataset(name, failure_limit)

    def delete(self, name: str) -> DeletionProgress:
        """Marks the dataset deleting (from then on search and ingestion treat it as gone) and queues its
        deletion; asking again for a dataset being deleted queues it again, which is harmless.

        Objects under the dataset's prefixes that the catalog never recorded (uploads never ingested)
        are a dataset too: it gets a row only to track their deletion. With neither, DatasetNotFound.
        """
        try:
            task, progress = self._catalog.request_deletion(name)
        except DatasetNotFound:
            if not any(next(iter(self._store.list(prefix)), None) for prefix in _prefixes(name)):
                raise
            task, progress = self._catalog.request_deletion(name, create_missing=True)
        self._deletion_queue.send([task_message(task)])
        logger.info("deletion of dataset %s (#%d) queued", name, task.dataset_id)
        return progress

    def continue_deletion(self, task: DeletionTask, has_time: Callable[[], bool]) -> DeletionOutcome:
        """The objects in pages, then the image rows in pages, then the dataset row; every step can run
        again, so a worker that died is simply resumed. When `has_time` says to stop, the task is queued
        again (UNFINISHED).

        Images uploaded after the deletion was asked for are kept (their LastModified is later): ingestion
        retries them while the dataset is being deleted, and they start a new dataset once this one is gone.
        """
        requested_at = self._catalog.claim_deletion(task.dataset_id, LEASE_SECONDS)
        if requested_at is None:
            logger.info("deletion of %s (#%d): gone or held by another worker", task.dataset, task.dataset_id)
            return DeletionOutcome.SKIPPED
        for prefix in _prefixes(task.dataset):
            listing = (
                info.key
                for info in self._store.list(prefix)
                if prefix != dataset_prefix(task.dataset) or info.last_modified is None or info.last_modified <= requested_at
            )
            while page := list(islice(listing, OBJECT_PAGE)):
                if not has_time():
                    return self._pause(task)
                self._store.delete_many(page)
                self._catalog.record_deletion_progress(task.dataset_id, len(page), 0, LEASE_SECONDS)
        while rows := self._catalog.delete_image_rows(task.dataset_id, ROW_PAGE):
            self._catalog.record_deletion_progress(task.dataset_id, 0, rows, LEASE_SECONDS)
            if not has_time():
                return self._pause(task)
        # Segments and thumbnails of batches in flight when the deletion began (their commits are refused).
        for prefix in _prefixes(task.dataset)[1:]:
            self._store.delete_many([info.key for info in islice(self._store.list(prefix), OBJECT_PAGE)])
        try:
            self._catalog.remove_dataset(task.dataset)
        except DatasetNotFound:
            pass  # a second worker finished first
        logger.info("dataset %s (#%d) deleted", task.dataset, task.dataset_id)
        return DeletionOutcome.FINISHED

    def resume_stalled(self, has_time: Callable[[], bool], now: datetime | None = None) -> list[str]:
        """Takes over deletions whose worker died or whose message was lost; returns their names."""
        stalled = self._catalog.stalled_deletions((now or datetime.now(UTC)) - STALLED_AFTER)
        for task in stalled:
            logger.warning("resuming the stalled deletion of %s (#%d)", task.dataset, task.dataset_id)
            self.continue_deletion(task, has_time)
        return [task.dataset for task in stalled]

    def _pause(self, task: DeletionTask) -> DeletionOutcome:
        self._catalog.release_deletion(task.dataset_id)
        self._deletion_queue.send([task_message(task)])
        logger.info("deletion of %s (#%d) paused for lack of time and queued again", task.dataset, task.dataset_id)
        return DeletionOutcome.UNFINISHED


def _prefixes(name: str) -> tuple[str, ...]:
    return dataset_prefix(name), f"{INDEXES_PREFIX}{name}/", thumbnails_prefix(name)
