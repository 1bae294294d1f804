"""The dataset use case behind the API: list datasets, describe one, delete one with all its objects."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from clipsearch.datasets import INDEXES_PREFIX, dataset_prefix, thumbnail_key, thumbnails_prefix
from clipsearch.errors import DatasetNotFound
from clipsearch.ports import DatasetSummary, ObjectStore, SearchCatalog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetDeletion:
    dataset: str
    images: int  # distinct image keys the catalog knew
    segments: int
    objects_deleted: int  # objects found under the dataset's prefixes, including ones never ingested


class DatasetService:
    def __init__(self, catalog: SearchCatalog, store: ObjectStore) -> None:
        self._catalog = catalog
        self._store = store

    def list(self) -> Sequence[DatasetSummary]:
        return self._catalog.list_datasets()

    def describe(self, name: str, failure_limit: int = 20) -> DatasetSummary:
        """The catalog rejects an invalid name (InvalidDatasetName) as it reads the row."""
        return self._catalog.summarize_dataset(name, failure_limit)

    def delete(self, name: str) -> DatasetDeletion:
        """The images, their thumbnails and the segments in the bucket first, then the catalog rows.

        A failure part-way leaves the catalog row, so a retry finds the dataset and finishes (and no
        reconciliation re-creates it from images left behind). The ObjectRemoved events of the deleted
        images only mark rows that are about to go. Objects under the dataset's prefixes that the
        catalog never recorded (uploads still queued, orphan segments) go too; with neither rows nor
        objects the dataset does not exist.
        """
        cataloged = self._is_cataloged(name)
        keys = {
            info.key
            for prefix in (dataset_prefix(name), f"{INDEXES_PREFIX}{name}/", thumbnails_prefix(name))
            for info in self._store.list(prefix)
        }
        if not cataloged and not keys:
            raise DatasetNotFound(name)
        self._store.delete_many(sorted(keys))
        images = segments = 0
        if cataloged:
            removal = self._catalog.remove_dataset(name)
            # A batch committed between the listing and the removal wrote objects no row will name any more.
            written = {*removal.image_keys, *map(thumbnail_key, removal.image_keys), *removal.segment_keys}
            self._store.delete_many(sorted(written - keys))
            images, segments = len(removal.image_keys), len(removal.segment_keys)
        logger.info("deleted dataset %s: %d images, %d segments, %d objects", name, images, segments, len(keys))
        return DatasetDeletion(name, images, segments, len(keys))

    def _is_cataloged(self, name: str) -> bool:
        try:
            self._catalog.get_dataset(name)
        except DatasetNotFound:
            return False
        return True
