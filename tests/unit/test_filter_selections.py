"""FilterSelections: a filter's ids read once per dataset version, re-read on a new version, within a byte budget."""

from __future__ import annotations

import numpy as np
import pytest
from clipsearch.fakes import InMemorySearchCatalog, InMemoryVectorIndex
from clipsearch.filter_selections import BYTES_PER_SELECTED_ID, FilterSelections
from clipsearch.ports import SegmentRef
from clipsearch.search_results import ImageFilter

pytestmark = pytest.mark.unit

FOLDER = ImageFilter(key_prefix="1")  # the fake's keys are datasets/<name>/<id>.jpg
NOTHING_DELETED = np.empty(0, dtype=np.int64)


class CountingCatalog(InMemorySearchCatalog):
    """Counts the filter queries that reach the catalog."""

    def __init__(self) -> None:
        super().__init__()
        self.filter_reads = 0

    def filtered_image_ids(self, dataset_id, key_prefix, since, until) -> np.ndarray:
        self.filter_reads += 1
        return super().filtered_image_ids(dataset_id, key_prefix, since, until)


def published(catalog: CountingCatalog, name: str, image_ids: list[int]):
    if name not in catalog.datasets:
        catalog.add_dataset(name, "m")
    return catalog.publish(name, SegmentRef(f"s{image_ids[0]}", f"indexes/{name}/s{image_ids[0]}", len(image_ids), "flat"), image_ids)


def selected(selection) -> set[int]:
    return set(selection.ids.tolist())


def test_a_filter_is_read_once_per_version_and_again_after_any_change() -> None:
    catalog = CountingCatalog()
    row = published(catalog, "photos", [1, 10, 11, 2])
    selections = FilterSelections(catalog, InMemoryVectorIndex())

    first = selections.select(row.id, row.name, row.index_version, FOLDER, NOTHING_DELETED)
    again = selections.select(row.id, row.name, row.index_version, FOLDER, NOTHING_DELETED)

    assert selected(first) == {1, 10, 11} and again is first
    assert catalog.filter_reads == 1

    row = catalog.delete_images("photos", [10])  # a deletion bumps index_version
    after_deletion = selections.select(row.id, row.name, row.index_version, FOLDER, NOTHING_DELETED)
    assert selected(after_deletion) == {1, 11}

    row = published(catalog, "photos", [12, 3])  # so does an ingest
    after_ingest = selections.select(row.id, row.name, row.index_version, FOLDER, NOTHING_DELETED)
    assert selected(after_ingest) == {1, 11, 12}
    assert catalog.filter_reads == 3
    assert len(selections) == 1, "a newer version drops the older versions' selections"


def test_no_filter_reads_nothing_and_no_match_is_kept_as_false() -> None:
    catalog = CountingCatalog()
    row = published(catalog, "photos", [2, 3])
    selections = FilterSelections(catalog, InMemoryVectorIndex())

    assert selections.select(row.id, row.name, row.index_version, ImageFilter(), NOTHING_DELETED) is None
    assert selections.select(row.id, row.name, row.index_version, FOLDER, NOTHING_DELETED) is False
    assert selections.select(row.id, row.name, row.index_version, FOLDER, NOTHING_DELETED) is False
    assert catalog.filter_reads == 1


def test_a_request_of_an_older_snapshot_reads_anew_and_keeps_nothing() -> None:
    catalog = CountingCatalog()
    old = published(catalog, "photos", [1, 10])
    new = published(catalog, "photos", [11])
    selections = FilterSelections(catalog, InMemoryVectorIndex())
    selections.select(new.id, new.name, new.index_version, FOLDER, NOTHING_DELETED)

    selections.select(old.id, old.name, old.index_version, FOLDER, NOTHING_DELETED)
    selections.select(old.id, old.name, old.index_version, FOLDER, NOTHING_DELETED)

    assert catalog.filter_reads == 3
    assert len(selections) == 1


def test_the_least_recently_used_selections_go_beyond_the_byte_budget() -> None:
    catalog = CountingCatalog()
    rows = [published(catalog, f"d{number}", [100 + 10 * number + i for i in range(5)]) for number in range(1, 4)]
    # Room for two selections of 5 ids.
    selections = FilterSelections(catalog, InMemoryVectorIndex(), max_bytes=10 * BYTES_PER_SELECTED_ID)
    for row in rows[:2]:
        selections.select(row.id, row.name, row.index_version, FOLDER, NOTHING_DELETED)
    selections.select(rows[0].id, rows[0].name, rows[0].index_version, FOLDER, NOTHING_DELETED)  # d1 used last
    selections.select(rows[2].id, rows[2].name, rows[2].index_version, FOLDER, NOTHING_DELETED)  # d2 goes

    assert len(selections) == 2 and selections.nbytes == 10 * BYTES_PER_SELECTED_ID
    reads = catalog.filter_reads
    selections.select(rows[0].id, rows[0].name, rows[0].index_version, FOLDER, NOTHING_DELETED)
    assert catalog.filter_reads == reads
    selections.select(rows[1].id, rows[1].name, rows[1].index_version, FOLDER, NOTHING_DELETED)
    assert catalog.filter_reads == reads + 1


class FolderIndexCatalog(CountingCatalog):
    """Answers a folder with the ids its segments were written with, deleted ones included, as a folder index may."""

    def filtered_image_ids(self, dataset_id, key_prefix, since, until) -> np.ndarray:
        self.filter_reads += 1
        return np.array([1, 10, 11], dtype=np.int64)


def test_the_snapshots_deleted_ids_never_enter_a_selection() -> None:
    catalog = FolderIndexCatalog()
    row = published(catalog, "photos", [1, 10, 11, 2])
    selections = FilterSelections(catalog, InMemoryVectorIndex())

    selection = selections.select(row.id, row.name, row.index_version, FOLDER, np.array([2, 10], dtype=np.int64))

    assert selected(selection) == {1, 11}
    assert selections.select(row.id, row.name, row.index_version + 1, FOLDER,
                             np.array([1, 10, 11], dtype=np.int64)) is False
