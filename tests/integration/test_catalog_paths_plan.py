"""The search path's hit lookup (PostgresCatalog.image_locations) reads by primary key even before ANALYZE."""

from __future__ import annotations

import pytest
from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
from clipsearch.adapters.postgres_connection import Database
from clipsearch.ports import NewSegment

pytestmark = pytest.mark.integration

ROWS = 5_000
FILTER_INDEXES = ("images_indexed_by_time", "images_indexed_by_key_bytes")


def test_hits_are_found_by_primary_key_in_a_table_never_analyzed(database_url: str) -> None:
    """A bulk ingest leaves the table without statistics until autovacuum runs: `status = 'indexed'` in the
    query was then planned against a partial filter index, reading every indexed row's entry."""
    database = Database(database_url)
    migrate(database)
    catalog = PostgresCatalog(database)
    dataset = catalog.ensure_dataset("bulk", "model-a")
    catalog.commit_batch(dataset.id, NewSegment("s1", "indexes/bulk/segments/s1.faiss", ROWS, "ivf_sq8"), [], [])
    with database.transaction() as connection:
        connection.execute(
            "INSERT INTO images (dataset_id, bucket, object_key, etag, source_path, sha256, byte_size, status,"
            " segment_id, attempts) SELECT %s, 'b', 'datasets/bulk/' || n || '.jpg', 'e', '/p/' || n || '.jpg',"
            " repeat('0', 64), 1, CASE WHEN n = 7 THEN 'deleted' ELSE 'indexed' END, 's1', 1"
            " FROM generate_series(1, %s) AS n",
            (dataset.id, ROWS),
        )
        ids = [row["id"] for row in connection.execute("SELECT id FROM images ORDER BY id LIMIT 10")]
        deleted = connection.execute("SELECT id FROM images WHERE status = 'deleted'").fetchone()["id"]
        never_analyzed = connection.execute("SELECT reltuples FROM pg_class WHERE relname = 'images'").fetchone()
    assert never_analyzed["reltuples"] < 0

    before = _index_scans(database)
    locations = catalog.image_locations(ids)
    scans = {name: count - before[name] for name, count in _index_scans(database).items()}

    assert sorted(locations) == sorted(set(ids) - {deleted})
    assert locations[ids[0]].source_path == "/p/1.jpg"
    assert scans["images_pkey"] >= 1
    assert all(scans[name] == 0 for name in FILTER_INDEXES), scans
    database.close()


def _index_scans(database: Database) -> dict[str, int]:
    """Scans per index of `images`, with this connection's pending statistics flushed first."""
    with database.read() as connection:
        connection.execute("SELECT pg_stat_force_next_flush()")
    with database.read() as connection:
        rows = connection.execute("SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE relname = 'images'")
        return {row["indexrelname"]: row["idx_scan"] for row in rows}
