"""The catalog's folder index (migration 005) against a real PostgreSQL: prefixes answered exactly as key prefixes,
deleted and re-ingested images, compaction, dataset deletion, and the back-fill of existing datasets."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
from clipsearch.adapters.postgres_connection import Database
from clipsearch.fakes import InMemoryVectorIndex
from clipsearch.filter_selections import FilterSelections
from clipsearch.ports import IndexedImage, NewImage, NewSegment
from clipsearch.search_results import ImageFilter

pytestmark = pytest.mark.integration

DATASET = "folders"
# Two batches, so a folder has rows of two segments; `a/b` is a file name prefix, a folder, and a prefix of `a/bc/`.
BATCHES = [
    ["a/b.jpg", "a/b/1.jpg", "a/bc/2.jpg", "a/b/c/3.jpg", "root.jpg", "rootx/4.jpg", "a/x.jpg"],
    ["a/bd.jpg", "a/b/5.jpg", "a/bc/d/6.jpg", "r.jpg", "a/b.jpg.bak", "é/7.jpg", "a/b0/8.jpg"],
]
PREFIXES = ["", "a", "a/", "a/b", "a/b/", "a/b.", "a/b.jpg", "a/bc", "a/bc/", "a/b/c", "a/b/c/", "a/b/c/3",
            "r", "root", "root.jpg", "rootx/", "é", "a/bc/d/6.jpgx", "nowhere/", "a/b/1.jpg"]


def index_batch(catalog: PostgresCatalog, dataset_id: int, relatives: list[str], segment_id: str,
                etag: str = "e1", dataset: str = DATASET) -> dict[str, int]:
    claims = catalog.claim_images(dataset_id, [
        NewImage("bucket", f"datasets/{dataset}/{relative}", etag, None, "0" * 64, 1) for relative in relatives
    ])
    segment = NewSegment(segment_id, f"indexes/{dataset}/segments/{segment_id}.faiss", len(claims), "flat")
    catalog.commit_batch(dataset_id, segment, [IndexedImage(claim.id, 1, 1) for claim in claims], [])
    return {claim.key.removeprefix(f"datasets/{dataset}/"): claim.id for claim in claims}


def matching(catalog: PostgresCatalog, dataset_id: int, prefix: str) -> list[int]:
    return catalog.filtered_image_ids(dataset_id, f"datasets/{DATASET}/{prefix}", None, None).tolist()


def live_matching(catalog: PostgresCatalog, dataset_id: int, prefix: str) -> set[int]:
    """What a search selects: the catalog's answer less the snapshot's deleted ids, as FilterSelections reads it."""
    row = catalog.get_dataset(DATASET)
    deleted = np.array(sorted(catalog.deleted_image_ids(dataset_id)), dtype=np.int64)
    selection = FilterSelections(catalog, InMemoryVectorIndex()).select(
        dataset_id, DATASET, row.index_version, ImageFilter(key_prefix=prefix), deleted)
    return set(selection.ids.tolist()) if selection is not False else set()


def test_every_prefix_matches_exactly_the_keys_that_start_with_it(catalog: PostgresCatalog) -> None:
    row = catalog.ensure_dataset(DATASET, "m")
    id_of = {**index_batch(catalog, row.id, BATCHES[0], "s1"), **index_batch(catalog, row.id, BATCHES[1], "s2")}
    other = catalog.ensure_dataset("folders2", "m")  # the same paths in another dataset never match
    index_batch(catalog, other.id, BATCHES[0], "o1", dataset="folders2")

    for prefix in PREFIXES:
        found = matching(catalog, row.id, prefix)
        expected = {image_id for relative, image_id in id_of.items() if relative.startswith(prefix)}
        assert sorted(found) == sorted(expected), prefix  # each id once

    with catalog._database.read() as connection:
        folders = connection.execute(
            "SELECT folder, segment_id FROM image_folders WHERE dataset_id = %s ORDER BY folder, segment_id", (row.id,)
        ).fetchall()
    assert ("datasets/folders/a/b/", "s1") in {(r["folder"], r["segment_id"]) for r in folders}
    assert ("datasets/folders/", "s2") in {(r["folder"], r["segment_id"]) for r in folders}, "root-level files"


def test_deleted_and_reingested_images_never_come_back_and_compaction_drops_them(catalog: PostgresCatalog) -> None:
    row = catalog.ensure_dataset(DATASET, "m")
    first = index_batch(catalog, row.id, BATCHES[0], "s1")
    assert catalog.remove_images(DATASET, f"datasets/{DATASET}/a/b/1.jpg", None) == 1
    again = index_batch(catalog, row.id, ["a/b/c/3.jpg"], "s2", etag="e2")  # re-ingest of the same path

    # The folder index still holds both old ids (its rows are written per segment); a search never selects them.
    assert {first["a/b/1.jpg"], first["a/b/c/3.jpg"]} <= set(matching(catalog, row.id, "a/b/"))
    assert live_matching(catalog, row.id, "a/b/") == {again["a/b/c/3.jpg"]}
    assert live_matching(catalog, row.id, "a/b") == {first["a/b.jpg"], first["a/bc/2.jpg"], again["a/b/c/3.jpg"]}

    live = {first[relative] for relative in first if relative not in ("a/b/1.jpg", "a/b/c/3.jpg")}
    live.add(again["a/b/c/3.jpg"])
    merged = NewSegment("m1", f"indexes/{DATASET}/segments/m1.faiss", len(live), "flat")
    assert catalog.publish_compaction(row.id, merged, ["s1", "s2"], sorted(live)) is not None

    assert sorted(matching(catalog, row.id, "a/b/")) == [again["a/b/c/3.jpg"]]
    assert sorted(matching(catalog, row.id, "")) == sorted(live)
    with catalog._database.read() as connection:
        segments = {r["segment_id"] for r in connection.execute(
            "SELECT segment_id FROM image_folders WHERE dataset_id = %s", (row.id,))}
    assert segments == {"m1"}

    catalog.remove_dataset(DATASET)
    with catalog._database.read() as connection:
        assert connection.execute("SELECT count(*) AS n FROM image_folders").fetchone()["n"] == 0


def test_the_migration_back_fills_existing_datasets(database_url: str) -> None:
    """Datasets indexed before migration 005 answer folder prefixes from its back-fill: live segments' indexed
    images only."""
    scripts = sorted((entry for entry in (resources.files("clipsearch") / "migrations").iterdir()
                      if entry.name.endswith(".sql")), key=lambda entry: entry.name)
    before = [script for script in scripts if script.name < "005"]
    database = Database(database_url)
    try:
        with database.transaction() as connection:
            connection.execute("CREATE TABLE schema_migrations ("
                               " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            for script in before:
                connection.execute(script.read_text(encoding="utf-8"))
                connection.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (script.name,))
            dataset_id = connection.execute(
                "INSERT INTO datasets (name, model_id, index_version) VALUES (%s, 'm', 2) RETURNING id", (DATASET,)
            ).fetchone()["id"]
            connection.execute(
                "INSERT INTO segments (id, dataset_id, object_key, vector_count, index_type, created_version,"
                " retired_at, retired_version) VALUES ('live', %s, 'k1', 3, 'flat', 2, NULL, NULL),"
                " ('old', %s, 'k2', 1, 'flat', 1, now(), 2)", (dataset_id, dataset_id))
            rows = [("a/1.jpg", "indexed", "live"), ("a/b/2.jpg", "indexed", "live"), ("3.jpg", "indexed", "live"),
                    ("a/4.jpg", "deleted", "live"), ("a/5.jpg", "pending", None), ("a/6.jpg", "indexed", "old")]
            id_of = {relative: connection.execute(
                "INSERT INTO images (dataset_id, bucket, object_key, etag, status, segment_id)"
                " VALUES (%s, 'bucket', %s, 'e', %s, %s) RETURNING id",
                (dataset_id, f"datasets/{DATASET}/{relative}", status, segment)).fetchone()["id"]
                for relative, status, segment in rows}

        assert migrate(database) == [script.name for script in scripts if script.name >= "005"]

        catalog = PostgresCatalog(database)
        assert sorted(matching(catalog, dataset_id, "a/")) == sorted([id_of["a/1.jpg"], id_of["a/b/2.jpg"]])
        assert sorted(matching(catalog, dataset_id, "")) == sorted([id_of["a/1.jpg"], id_of["a/b/2.jpg"],
                                                                   id_of["3.jpg"]])
    finally:
        database.close()
