"""Asynchronous dataset deletion over the in-memory fakes: pages, leases, pauses, a worker that dies, the sweep."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from clipsearch.dataset_service import (
    OBJECT_PAGE,
    DatasetService,
    DeletionOutcome,
    parse_task_message,
)
from clipsearch.errors import DatasetDeleting, DatasetNotFound, InvalidRequest
from clipsearch.fakes import InMemoryMessageQueue, InMemoryObjectStore, InMemorySearchCatalog
from clipsearch.ports import SegmentRef

pytestmark = pytest.mark.unit


def always() -> bool:
    return True


class DyingStore(InMemoryObjectStore):
    """Dies (as a killed worker would) on the delete_many call number `dies_at`."""

    def __init__(self, dies_at: int) -> None:
        super().__init__()
        self.calls, self.dies_at = 0, dies_at

    def delete_many(self, keys) -> None:
        self.calls += 1
        if self.calls == self.dies_at:
            raise RuntimeError("worker killed")
        super().delete_many(keys)


def populated(store: InMemoryObjectStore, images: int) -> InMemorySearchCatalog:
    catalog = InMemorySearchCatalog(store.bucket)
    catalog.add_dataset("pets", "m")
    catalog.publish("pets", SegmentRef("s1", "indexes/pets/segments/s1.faiss", images, "flat"), range(1, images + 1))
    for number in range(1, images + 1):
        store.put(f"datasets/pets/{number}.jpg", b"x")
        store.put(f"thumbnails/pets/{number}.jpg.webp", b"t")
    store.put("indexes/pets/segments/s1.faiss", b"segment")
    store.put("datasets/other/keep.jpg", b"x")
    return catalog


def test_delete_marks_the_dataset_deleting_and_queues_one_task() -> None:
    store, queue = InMemoryObjectStore(), InMemoryMessageQueue()
    catalog = populated(store, 3)
    service = DatasetService(catalog, store, queue)

    progress = service.delete("pets")

    assert (progress.objects_deleted, progress.progress_at) == (0, None)
    assert len(store.objects) == 8  # nothing removed inside the request
    with pytest.raises(DatasetDeleting):
        catalog.get_dataset("pets")  # search and ingestion: gone
    assert service.describe("pets").deletion is not None  # the API: still shown, with progress
    task = parse_task_message(queue.sent[0])
    assert (task.dataset, task.dataset_id) == ("pets", catalog.datasets["pets"].id)
    service.delete("pets")  # again while it runs: the same deletion, queued again
    assert len(queue.sent) == 2 and parse_task_message(queue.sent[1]) == task


def test_the_worker_removes_objects_in_pages_then_rows_then_the_dataset() -> None:
    store, queue = InMemoryObjectStore(), InMemoryMessageQueue()
    images = OBJECT_PAGE + 5  # the images' prefix takes two pages
    catalog = populated(store, images)
    service = DatasetService(catalog, store, queue)
    service.delete("pets")
    deleted_pages = []
    original = store.delete_many
    store.delete_many = lambda keys: (deleted_pages.append(len(list(keys))), original(keys))  # type: ignore[method-assign]

    outcome = service.continue_deletion(parse_task_message(queue.take()[0]), always)

    assert outcome is DeletionOutcome.FINISHED
    assert max(deleted_pages) <= OBJECT_PAGE and deleted_pages[:2] == [OBJECT_PAGE, 5]
    assert set(store.objects) == {"datasets/other/keep.jpg"}
    with pytest.raises(DatasetNotFound):
        service.describe("pets")
    with pytest.raises(DatasetNotFound):
        service.delete("pets")


def test_a_worker_killed_after_its_first_page_is_resumed_once_its_lease_runs_out() -> None:
    store, queue = DyingStore(dies_at=2), InMemoryMessageQueue()
    catalog = populated(store, 4)
    service = DatasetService(catalog, store, queue)
    service.delete("pets")
    task = parse_task_message(queue.take()[0])

    with pytest.raises(RuntimeError, match="worker killed"):
        service.continue_deletion(task, always)

    summary = service.describe("pets")
    assert summary.deletion.objects_deleted == 4 and len(store.objects) == 6  # the first page went
    # The message comes back while the dead worker's lease still runs: nothing happens twice at once.
    assert service.continue_deletion(task, always) is DeletionOutcome.SKIPPED
    catalog.deletions[task.dataset_id].lease_until = datetime.now(UTC) - timedelta(seconds=1)
    assert service.continue_deletion(task, always) is DeletionOutcome.FINISHED
    assert set(store.objects) == {"datasets/other/keep.jpg"} and "pets" not in catalog.datasets
    assert service.continue_deletion(task, always) is DeletionOutcome.SKIPPED  # a late duplicate: harmless


def test_a_worker_out_of_time_releases_its_lease_and_queues_the_rest() -> None:
    store, queue = InMemoryObjectStore(), InMemoryMessageQueue()
    catalog = populated(store, 2)
    service = DatasetService(catalog, store, queue)
    service.delete("pets")
    task = parse_task_message(queue.take()[0])
    budget = iter([True, False])

    assert service.continue_deletion(task, lambda: next(budget)) is DeletionOutcome.UNFINISHED

    assert len(store.objects) == 4  # one page (the 2 images) went
    assert [parse_task_message(body) for body in queue.take()] == [task]
    assert service.continue_deletion(task, always) is DeletionOutcome.FINISHED  # at once: the lease was released
    assert set(store.objects) == {"datasets/other/keep.jpg"}


def test_a_stale_task_never_touches_a_new_dataset_of_the_same_name() -> None:
    store, queue = InMemoryObjectStore(), InMemoryMessageQueue()
    catalog = populated(store, 1)
    service = DatasetService(catalog, store, queue)
    service.delete("pets")
    task = parse_task_message(queue.take()[0])
    assert service.continue_deletion(task, always) is DeletionOutcome.FINISHED
    catalog.add_dataset("pets", "m")
    store.put("datasets/pets/new.jpg", b"x")

    assert service.continue_deletion(task, always) is DeletionOutcome.SKIPPED
    assert "datasets/pets/new.jpg" in store.objects and catalog.get_dataset("pets").id != task.dataset_id


def test_objects_without_catalog_rows_are_a_dataset_to_delete_and_nothing_at_all_is_404() -> None:
    store, queue = InMemoryObjectStore(), InMemoryMessageQueue()
    catalog = InMemorySearchCatalog(store.bucket)
    service = DatasetService(catalog, store, queue)
    store.put("datasets/orphans/a.jpg", b"x")

    service.delete("orphans")
    assert service.continue_deletion(parse_task_message(queue.take()[0]), always) is DeletionOutcome.FINISHED

    assert store.objects == {} and catalog.datasets == {}
    with pytest.raises(DatasetNotFound):
        service.delete("nothing")
    assert queue.sent == []


def test_the_sweep_resumes_only_deletions_left_without_a_worker() -> None:
    store, queue = InMemoryObjectStore(), InMemoryMessageQueue()
    catalog = populated(store, 2)
    service = DatasetService(catalog, store, queue)
    service.delete("pets")
    queue.take()  # the message is lost

    assert service.resume_stalled(always) == []  # too young: its message may still be on its way
    later = datetime.now(UTC) + timedelta(minutes=10)
    assert service.resume_stalled(always, now=later) == ["pets"]
    assert set(store.objects) == {"datasets/other/keep.jpg"} and "pets" not in catalog.datasets


def test_a_message_that_is_no_task_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        parse_task_message(json.dumps({"dataset": "pets"}))
    with pytest.raises(InvalidRequest):
        parse_task_message("not json")


def test_an_image_uploaded_after_the_deletion_was_asked_for_is_kept_for_a_new_dataset() -> None:
    store, queue = InMemoryObjectStore(), InMemoryMessageQueue()
    catalog = populated(store, 3)
    service = DatasetService(catalog, store, queue)
    asked = service.delete("pets").requested_at
    store.put("datasets/pets/new.jpg", b"uploaded after the DELETE")
    store.modified["datasets/pets/new.jpg"] = asked + timedelta(seconds=1)

    outcome = service.continue_deletion(parse_task_message(queue.take()[0]), always)

    assert outcome is DeletionOutcome.FINISHED
    assert set(store.objects) == {"datasets/other/keep.jpg", "datasets/pets/new.jpg"}
    with pytest.raises(DatasetNotFound):
        service.describe("pets")
