"""The reconciliation use case: make the catalog agree with the bucket, through the normal ingestion path.

Every image under `datasets/<name>/` that the catalog lacks, holds with another etag, or holds only
as pending is announced on the ingestion queue as an S3 notification, so the preprocessing function
indexes it as if its event had arrived; images the catalog holds but the bucket no longer has are
marked deleted. The catalog is read before the bucket is listed: an image indexed in between is then
merely announced twice (idempotent), never marked deleted by mistake.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clipsearch.datasets import (
    DATASETS_PREFIX,
    dataset_prefix,
    has_image_suffix,
    parse_image_key,
)
from clipsearch.errors import MaintenanceFailed
from clipsearch.events import chunks, created_notification
from clipsearch.ports import Catalog, LiveImage, MessageQueue, ObjectInfo, ObjectStore

logger = logging.getLogger(__name__)

RECORDS_PER_MESSAGE = 50  # S3 sends one record per message; more per message means fewer receives


@dataclass(frozen=True)
class ReconcileReport:
    dataset: str
    scanned: int
    enqueued: int
    marked_deleted: int


class ReconcileService:
    def __init__(self, store: ObjectStore, catalog: Catalog, queue: MessageQueue) -> None:
        self._store = store
        self._catalog = catalog
        self._queue = queue

    def reconcile_dataset(self, name: str) -> ReconcileReport:
        known = self._catalog.live_images(name)
        listed = [item for item in self._store.list(dataset_prefix(name)) if _is_image(item)]
        return self._reconcile(name, known, listed)

    def reconcile_all(self) -> list[ReconcileReport]:
        """Every dataset the bucket or the catalog knows, from one listing of `datasets/`.

        A failing dataset does not hold back the others; MaintenanceFailed names the failed ones at the end.
        """
        names = {summary.dataset.name for summary in self._catalog.list_datasets()}
        known = {name: self._catalog.live_images(name) for name in names}
        listed: dict[str, list[ObjectInfo]] = {}
        for item in self._store.list(DATASETS_PREFIX):
            if _is_image(item):
                listed.setdefault(parse_image_key(item.key).dataset, []).append(item)
        reports, failed = [], []
        for name in sorted(names | listed.keys()):
            try:
                reports.append(self._reconcile(name, known.get(name, {}), listed.get(name, [])))
            except Exception:  # any failure: datasets are independent; re-raised below
                logger.exception("reconciliation of dataset %r failed", name)
                failed.append(name)
        if failed:
            raise MaintenanceFailed(f"reconciliation failed for datasets {failed} ({len(reports)} reconciled)")
        return reports

    def _reconcile(
        self, name: str, known: Mapping[str, LiveImage], listed: Sequence[ObjectInfo]
    ) -> ReconcileReport:
        missing = [
            item for item in listed
            if item.key not in known or known[item.key].etag != item.etag or known[item.key].status == "pending"
        ]
        for batch in chunks(missing, RECORDS_PER_MESSAGE):
            self._queue.send([created_notification(self._store.bucket, batch)])
        present = {item.key for item in listed}
        marked = sum(self._remove_vanished(name, key) for key in known if key not in present)
        logger.info("dataset %r: %d images listed, %d enqueued, %d marked deleted",
                    name, len(listed), len(missing), marked)
        return ReconcileReport(name, len(listed), len(missing), marked)


    def _remove_vanished(self, name: str, key: str) -> int:
        """The listing may be minutes old: a key uploaded again since is left to its own event."""
        if self._store.head(key) is not None:
            logger.info("not removing %r: it was uploaded again after the listing", key)
            return 0
        return self._catalog.remove_images(name, key, None)


def _is_image(item: ObjectInfo) -> bool:
    return parse_image_key(item.key) is not None and has_image_suffix(item.key)
