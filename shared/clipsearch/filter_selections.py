"""Search filters as id selections: read from the catalog, and kept per dataset version for the next pages.

A filter (key prefix, ingest-time range) becomes the selection of the matching live ids, which FAISS
searches through: a filtered page holds k hits without fetching more and dropping. A folder prefix reads the
catalog's folder index (a few rows of packed ids per folder: 0.4 ms of PostgreSQL's CPU and 0.4 ms of ours for
10,000 of 100,000 ids); a time range reads one index entry per image (3-4 ms of PostgreSQL's CPU for 10,000),
benchmarks/filtered_search.py. The folder index may
still hold ids of deleted images: they are removed here with the snapshot's deleted ids, so a selection holds
only ids live in the snapshot it serves. `FilterSelections` keeps recent selections for the dataset version they
were read for: the next page of the same folder, or the same folder asked again, skips the catalog. The search
function (SearchService) and each shard searcher (ShardSearchService) keep their own.

Why a kept selection is never stale: every catalog change a search can see (ingest, deletion, compaction)
bumps the dataset's `index_version`, and a selection is keyed by the version of the snapshot it is used
with, read only after that snapshot existed, less that snapshot's deleted ids. So it admits no image deleted up
to that version (a deleted image never comes back), and a newer version (new images) is another key, read anew. Older versions of a
dataset are dropped as soon as a newer one is stored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from clipsearch.datasets import dataset_prefix
from clipsearch.ports import IdSelection, SearchCatalog, VectorIndex
from clipsearch.search_results import ImageFilter

# What one selected id may hold: its int64, and the hash-set entry of the FAISS selector a flat segment builds.
BYTES_PER_SELECTED_ID = 48
# The selections kept together: ~700,000 selected ids, small beside a search function's snapshots.
DEFAULT_SELECTION_CACHE_BYTES = 32 * 2**20

Selection = IdSelection | None | bool  # None: no filter; False: no image matches


def _matching_ids(catalog: SearchCatalog, dataset_id: int, dataset: str, image_filter: ImageFilter,
                  deleted_ids: np.ndarray) -> np.ndarray:
    # Every key of the dataset is under its prefix: without a folder, no key condition, so a time range is one
    # index-only scan (with the dataset's whole key range too, PostgreSQL read the table: 2x the CPU at 100k).
    key_prefix = dataset_prefix(dataset) + image_filter.key_prefix if image_filter.key_prefix else None
    ids = np.asarray(catalog.filtered_image_ids(dataset_id, key_prefix, image_filter.since, image_filter.until),
                     dtype=np.int64)
    return ids[~np.isin(ids, deleted_ids)] if len(deleted_ids) and len(ids) else ids


class FilterSelections:
    """Recent filters' selections per (dataset, index_version), least recently used dropped beyond `max_bytes`."""

    def __init__(self, catalog: SearchCatalog, vector_index: VectorIndex,
                 max_bytes: int = DEFAULT_SELECTION_CACHE_BYTES) -> None:
        self._catalog = catalog
        self._vector_index = vector_index
        self._max_bytes = max_bytes
        self._kept: OrderedDict[tuple[int, int, ImageFilter], tuple[Selection, int]] = OrderedDict()
        self._newest_version: dict[int, int] = {}  # dataset id -> the newest index_version kept
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._kept)

    def select(self, dataset_id: int, dataset: str, index_version: int, image_filter: ImageFilter,
               deleted_ids: np.ndarray) -> Selection:
        """None without a filter; False when no image matches; else the selection of the matching live ids, for a
        search of the snapshot at `index_version`, which must exist already, and whose deleted ids (those whose
        vectors its segments still hold) are `deleted_ids`."""
        if not image_filter.active:
            return None
        key = (dataset_id, index_version, image_filter)
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
                return kept[0]
        # Read outside the lock: concurrent first uses of one filter may both read it, none waits on another.
        ids = _matching_ids(self._catalog, dataset_id, dataset, image_filter, deleted_ids)
        selection = self._vector_index.selection(ids) if len(ids) else False
        self._keep(key, selection, BYTES_PER_SELECTED_ID * max(len(ids), 1))
        return selection

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self._newest_version.clear()
            self._bytes = 0

    def _keep(self, key: tuple[int, int, ImageFilter], selection: Selection, size: int) -> None:
        dataset_id, index_version, _ = key
        with self._lock:
            newest = self._newest_version.get(dataset_id, -1)
            if index_version < newest or size > self._max_bytes or key in self._kept:
                return  # a request of an older snapshot: its version will not be asked for long
            if index_version > newest:
                self._newest_version[dataset_id] = index_version
                for older in [kept for kept in self._kept if kept[0] == dataset_id]:
                    self._bytes -= self._kept.pop(older)[1]
            self._kept[key] = (selection, size)
            self._bytes += size
            while self._bytes > self._max_bytes:
                self._bytes -= self._kept.popitem(last=False)[1][1]
