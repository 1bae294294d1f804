"""PostgresCatalog against a real PostgreSQL: migrations, the search-side reads, and batch commits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from importlib import resources

import psycopg
import pytest
from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
from clipsearch.adapters.postgres_connection import Database
from clipsearch.errors import (
    ClipsearchError,
    DatasetNotFound,
    InvalidDatasetName,
    ModelMismatch,
    TransientError,
)
from clipsearch.ports import FailedImage, IndexedImage, NewImage, NewSegment

MIGRATIONS = sorted(entry.name for entry in (resources.files("clipsearch") / "migrations").iterdir()
                    if entry.name.endswith(".sql"))

pytestmark = pytest.mark.integration


@pytest.fixture
def database(database_url: str):
    database = Database(database_url)
    migrate(database)
    yield database
    database.close()


@pytest.fixture
def catalog(database: Database) -> PostgresCatalog:
    return PostgresCatalog(database)


def new_image(key: str, etag: str = "e1") -> NewImage:
    return NewImage("bucket-a", key, etag, f"/photos/{key}", "0" * 64, 123)


def index_batch(catalog, dataset_id, keys, segment_id, etag="e1"):
    claims = catalog.claim_images(dataset_id, [new_image(key, etag) for key in keys])
    segment = NewSegment(segment_id, f"indexes/ds/segments/{segment_id}.faiss", len(claims), "flat")
    outcome = catalog.commit_batch(
        dataset_id, segment, [IndexedImage(claim.id, 10, 20) for claim in claims], []
    )
    return claims, outcome


def test_migrate_is_idempotent_and_recorded(database: Database, database_url: str) -> None:
    assert migrate(database) == []
    with psycopg.connect(database_url) as connection:
        versions = [row[0] for row in connection.execute("SELECT version FROM schema_migrations")]
    assert versions == MIGRATIONS


def test_dataset_name_rule_is_enforced_by_the_schema(database_url: str, database: Database) -> None:
    with psycopg.connect(database_url) as connection, pytest.raises(psycopg.errors.CheckViolation):
        connection.execute("INSERT INTO datasets (name, model_id) VALUES ('-bad', 'm')")


def test_get_dataset_and_model_pin(catalog: PostgresCatalog) -> None:
    created = catalog.ensure_dataset("testDataset", "model-a")
    assert catalog.get_dataset("testDataset") == created
    assert created.index_version == 0
    with pytest.raises(ModelMismatch, match="model-a"):
        catalog.ensure_dataset("testDataset", "model-b")
    with pytest.raises(DatasetNotFound):
        catalog.get_dataset("testdataset")  # names are case-sensitive
    with pytest.raises(InvalidDatasetName, match="starting with a letter or digit"):
        catalog.get_dataset("_nope")


def test_search_reads_after_batches_and_deletion(catalog: PostgresCatalog) -> None:
    dataset = catalog.ensure_dataset("wildlife_photos", "model-a")
    claims, first = index_batch(catalog, dataset.id, ["datasets/wildlife_photos/a.jpg",
                                                       "datasets/wildlife_photos/b.jpg"], "s1")
    _, second = index_batch(catalog, dataset.id, ["datasets/wildlife_photos/c.jpg"], "s2")
    assert (first.index_version, second.index_version) == (1, 2)

    assert [segment.id for segment in catalog.live_segments(dataset.id)] == ["s1", "s2"]
    assert catalog.deleted_image_ids(dataset.id) == set()
    assert catalog.remove_images("wildlife_photos", "datasets/wildlife_photos/a.jpg", None) == 1
    assert catalog.deleted_image_ids(dataset.id) == {claims[0].id}
    assert catalog.get_dataset("wildlife_photos").index_version == 3

    locations = catalog.image_locations([claims[1].id, 999_999])
    assert list(locations) == [claims[1].id]
    assert locations[claims[1].id].key == "datasets/wildlife_photos/b.jpg"
    assert locations[claims[1].id].source_path == "/photos/datasets/wildlife_photos/b.jpg"
    assert locations[claims[1].id].bucket == "bucket-a"

    summary = catalog.summarize_dataset("wildlife_photos")
    assert dict(summary.counts) == {"pending": 0, "indexed": 2, "failed": 0, "deleted": 1}
    assert [s.dataset.name for s in catalog.list_datasets()] == ["wildlife_photos"]


def test_failures_are_summarized(catalog: PostgresCatalog) -> None:
    dataset = catalog.ensure_dataset("ds", "model-a")
    claims = catalog.claim_images(dataset.id, [new_image("datasets/ds/bad.jpg")])
    catalog.commit_batch(dataset.id, None, [], [FailedImage(claims[0].id, "cannot identify image")])
    summary = catalog.summarize_dataset("ds")
    assert summary.counts["failed"] == 1
    assert [(f.key, f.reason) for f in summary.recent_failures] == [
        ("datasets/ds/bad.jpg", "cannot identify image")
    ]
    # the same version is not claimed again: failures are not retried
    assert catalog.claim_images(dataset.id, [new_image("datasets/ds/bad.jpg")]) == [None]


def test_replacing_content_supersedes_the_old_row(catalog: PostgresCatalog) -> None:
    dataset = catalog.ensure_dataset("ds", "model-a")
    (old,), _ = index_batch(catalog, dataset.id, ["datasets/ds/a.jpg"], "s1", etag="e1")
    (new,), _ = index_batch(catalog, dataset.id, ["datasets/ds/a.jpg"], "s2", etag="e2")
    assert new.id != old.id
    assert catalog.deleted_image_ids(dataset.id) == {old.id}
    assert catalog.live_images("ds")["datasets/ds/a.jpg"].etag == "e2"
    assert catalog.segment_members(dataset.id) == {new.id: "s2"}


def test_a_crashed_claim_is_reused_and_a_stale_claim_commits_nothing(catalog: PostgresCatalog) -> None:
    dataset = catalog.ensure_dataset("ds", "model-a")
    (first,) = catalog.claim_images(dataset.id, [new_image("datasets/ds/a.jpg")])
    (again,) = catalog.claim_images(dataset.id, [new_image("datasets/ds/a.jpg")])
    assert (again.id, again.attempts) == (first.id, 2)

    segment = NewSegment("s1", "indexes/ds/segments/s1.faiss", 1, "flat")
    assert catalog.commit_batch(dataset.id, segment, [IndexedImage(first.id, 1, 1)], []).index_version == 1
    late = NewSegment("s2", "indexes/ds/segments/s2.faiss", 1, "flat")
    outcome = catalog.commit_batch(dataset.id, late, [IndexedImage(again.id, 1, 1)], [])
    assert outcome.stale_ids == {first.id} and outcome.index_version is None
    assert [s.id for s in catalog.live_segments(dataset.id)] == ["s1"]
    assert catalog.get_dataset("ds").index_version == 1


def test_compaction_publish_retire_and_forget(catalog: PostgresCatalog) -> None:
    dataset = catalog.ensure_dataset("ds", "model-a")
    index_batch(catalog, dataset.id, ["datasets/ds/a.jpg"], "s1")
    (b,), _ = index_batch(catalog, dataset.id, ["datasets/ds/b.jpg"], "s2")
    catalog.remove_images("ds", "datasets/ds/a.jpg", None)
    merged = NewSegment("m1", "indexes/ds/segments/m1.faiss", 1, "flat")
    assert catalog.publish_compaction(dataset.id, merged, ["s1", "s2"], [b.id]) == 4
    assert catalog.publish_compaction(dataset.id, merged, ["s1", "s2"], [b.id]) is None
    assert [s.id for s in catalog.live_segments(dataset.id)] == ["m1"]
    assert catalog.deleted_image_ids(dataset.id) == set()
    assert catalog.segment_members(dataset.id) == {b.id: "m1"}
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert {s.id for s in catalog.retired_segments(dataset.id, later)} == {"s1", "s2"}
    catalog.forget_segments(["s1", "s2", "m1"])
    assert catalog.segment_keys(dataset.id) == {"indexes/ds/segments/m1.faiss"}


def test_remove_dataset_returns_what_to_delete(catalog: PostgresCatalog) -> None:
    dataset = catalog.ensure_dataset("ds", "model-a")
    index_batch(catalog, dataset.id, ["datasets/ds/a.jpg", "datasets/ds/b.jpg"], "s1")
    removal = catalog.remove_dataset("ds")
    assert removal.image_keys == ["datasets/ds/a.jpg", "datasets/ds/b.jpg"]
    assert removal.segment_keys == ["indexes/ds/segments/s1.faiss"]
    with pytest.raises(DatasetNotFound):
        catalog.get_dataset("ds")
    with pytest.raises(DatasetNotFound):
        catalog.remove_dataset("ds")


def test_an_older_claim_never_replaces_a_newer_live_version(catalog: PostgresCatalog) -> None:
    dataset = catalog.ensure_dataset("ds", "model-a")
    (older,) = catalog.claim_images(dataset.id, [new_image("datasets/ds/a.jpg", "e1")])
    (newer,) = catalog.claim_images(dataset.id, [new_image("datasets/ds/a.jpg", "e2")])
    segment = NewSegment("s2", "indexes/ds/segments/s2.faiss", 1, "flat")
    assert catalog.commit_batch(dataset.id, segment, [IndexedImage(newer.id, 1, 1)], []).index_version == 1
    late = NewSegment("s1", "indexes/ds/segments/s1.faiss", 1, "flat")
    outcome = catalog.commit_batch(dataset.id, late, [IndexedImage(older.id, 1, 1)], [])
    assert outcome.stale_ids == {older.id}
    assert catalog.live_images("ds")["datasets/ds/a.jpg"].etag == "e2"
    assert [s.id for s in catalog.live_segments(dataset.id)] == ["s2"]
    assert catalog.summarize_dataset("ds").counts["deleted"] == 1


def test_concurrent_migrations_apply_once(database_url: str) -> None:
    import threading

    databases = [Database(database_url) for _ in range(3)]
    applied: list[list[str]] = []
    threads = [threading.Thread(target=lambda d=d: applied.append(migrate(d))) for d in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for database in databases:
        database.close()
    assert sorted(applied) == [[], [], MIGRATIONS]


def statuses(catalog: PostgresCatalog, dataset: str) -> dict[tuple[str, str], str]:
    with catalog._database.transaction() as connection:
        rows = connection.execute(
            "SELECT object_key, etag, status FROM images i JOIN datasets d ON d.id = i.dataset_id"
            " WHERE d.name = %s",
            (dataset,),
        ).fetchall()
    return {(row["object_key"], row["etag"]): row["status"] for row in rows}


def test_a_commit_retires_older_pending_claims_of_its_keys(catalog: PostgresCatalog) -> None:
    """A batch claims a.jpg@e1 and dies; a.jpg is uploaded again as e2 and indexed by another batch."""
    dataset = catalog.ensure_dataset("ds", "model-a")
    catalog.claim_images(dataset.id, [new_image("datasets/ds/a.jpg", "e1")])
    index_batch(catalog, dataset.id, ["datasets/ds/a.jpg"], "s1", etag="e2")
    # the crashed batch's retry fetches e2: already live, nothing to claim
    assert catalog.claim_images(dataset.id, [new_image("datasets/ds/a.jpg", "e2")]) == [None]
    assert statuses(catalog, "ds") == {("datasets/ds/a.jpg", "e1"): "deleted",
                                       ("datasets/ds/a.jpg", "e2"): "indexed"}
    assert catalog.summarize_dataset("ds").counts["pending"] == 0


def test_a_claim_that_finds_its_version_live_retires_unfetchable_pending_claims(catalog) -> None:
    """e2 is indexed first; a batch that fetched e1 before the upload claims it afterwards and dies."""
    dataset = catalog.ensure_dataset("ds", "model-a")
    index_batch(catalog, dataset.id, ["datasets/ds/a.jpg"], "s1", etag="e2")
    catalog.claim_images(dataset.id, [new_image("datasets/ds/a.jpg", "e1")])
    assert catalog.live_images("ds")["datasets/ds/a.jpg"].status == "pending"  # reconciliation announces it
    assert catalog.claim_images(dataset.id, [new_image("datasets/ds/a.jpg", "e2")]) == [None]
    assert statuses(catalog, "ds")[("datasets/ds/a.jpg", "e1")] == "deleted"
    assert catalog.live_images("ds")["datasets/ds/a.jpg"].etag == "e2"
    assert catalog.get_dataset("ds").index_version == 1


def test_a_dataset_deleted_in_flight_is_reported_as_not_found(catalog: PostgresCatalog) -> None:
    dataset = catalog.ensure_dataset("ds", "model-a")
    claims = catalog.claim_images(dataset.id, [new_image("datasets/ds/a.jpg")])
    catalog.remove_dataset("ds")
    with pytest.raises(DatasetNotFound):
        catalog.claim_images(dataset.id, [new_image("datasets/ds/b.jpg")])
    with pytest.raises(DatasetNotFound):
        catalog.commit_batch(dataset.id, None, [], [FailedImage(claims[0].id, "bad")])
    assert catalog.list_datasets() == []  # the connection is still usable


def test_statement_errors_become_domain_errors_and_keep_the_connection(catalog, database) -> None:
    with (pytest.raises(ClipsearchError, match="catalog statement failed") as raised,
          database.transaction() as connection):
        connection.execute("INSERT INTO datasets (name, model_id) VALUES ('-bad', 'm')")
    assert not isinstance(raised.value, TransientError)
    with database.transaction() as connection:
        backend = connection.info.backend_pid
    with pytest.raises(TransientError, match="aborted the transaction"), database.transaction() as connection:
        connection.execute("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40P01'; END $$")
    with database.transaction() as connection:
        assert connection.info.backend_pid == backend  # a deadlock victim keeps its healthy connection


def test_removal_by_key_uses_the_key_index(catalog: PostgresCatalog, database: Database) -> None:
    dataset = catalog.ensure_dataset("ds", "model-a")
    with database.transaction() as connection:
        connection.execute(
            "INSERT INTO images (dataset_id, bucket, object_key, etag, status)"
            " SELECT %s, 'b', 'datasets/ds/' || n || '.jpg', 'e', 'indexed' FROM generate_series(1, 20000) n",
            (dataset.id,),
        )
        connection.execute("ANALYZE images")
        plan = "\n".join(
            row["QUERY PLAN"] for row in connection.execute(
                "EXPLAIN SELECT id FROM images WHERE dataset_id = %s AND status <> 'deleted'"
                " AND object_key = %s AND etag IS DISTINCT FROM %s",
                (dataset.id, "datasets/ds/7.jpg", None),
            )
        )
    assert "images_by_key" in plan, plan
