"""The dataset use case behind the API: list datasets, describe one, delete one with all its objects."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from clipsearch.datasets import INDEXES_PREFIX, dataset_prefix, validate_dataset_name
from clipsearch.ports import DatasetSummary, ObjectStore, SearchCatalog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetDeletion:
    dataset: str
    images: int  # distinct image keys the catalog knew
    segments: int
    objects_deleted: int  # everything removed from the bucket, including objects never ingested


class DatasetService:
    def __init__(self, catalog: SearchCatalog, store: ObjectStore) -> None:
        self._catalog = catalog
        self._store = store

    def list(self) -> Sequence[DatasetSummary]:
        return self._catalog.list_datasets()

    def describe(self, name: str, failure_limit: int = 20) -> DatasetSummary:
        return self._catalog.summarize_dataset(validate_dataset_name(name), failure_limit)

    def delete(self, name: str) -> DatasetDeletion:
        """Catalog rows first (so searches stop at once), then the images and segments in the bucket.

        Objects under the dataset's prefixes that the catalog never recorded (uploads still queued,
        orphan segments) go too; a failure here leaves only unreferenced objects, safe to delete again.
        """
        removal = self._catalog.remove_dataset(validate_dataset_name(name))
        keys = set(removal.image_keys) | set(removal.segment_keys)
        for prefix in (dataset_prefix(name), f"{INDEXES_PREFIX}{name}/"):
            keys.update(info.key for info in self._store.list(prefix))
        self._store.delete_many(sorted(keys))
        logger.info(
            "deleted dataset %s: %d images, %d segments, %d objects",
            name, len(removal.image_keys), len(removal.segment_keys), len(keys),
        )
        return DatasetDeletion(name, len(removal.image_keys), len(removal.segment_keys), len(keys))
