"""PostgresCatalog: datasets, segments and images in PostgreSQL (psycopg 3), plus the schema migrations."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources

import numpy as np
import psycopg

from clipsearch.adapters.postgres_connection import Database, PreparedRead
from clipsearch.datasets import validate_dataset_name
from clipsearch.errors import DatasetDeleting, DatasetNotFound, ModelMismatch, TransientError
from clipsearch.ports import (
    IMAGE_STATUSES,
    BatchCommit,
    ClaimedImage,
    Dataset,
    DatasetRemoval,
    DatasetSummary,
    DeletionProgress,
    DeletionTask,
    FailedImage,
    ImageFailure,
    ImageLocation,
    IndexedImage,
    LiveImage,
    NewImage,
    NewSegment,
    SegmentRef,
)

logger = logging.getLogger(__name__)

# Any constant works: it only has to be the same for every process applying migrations.
_MIGRATION_LOCK = 0x636C6970  # "clip"
_DATASET_COLUMNS = "id, name, model_id, index_version, created_at, updated_at"
_DELETION_COLUMNS = "deletion_requested_at, objects_deleted, rows_deleted, deletion_progress_at"
_DELETING = "deletion_requested_at IS NOT NULL"
# The two reads of every warm search query, run as prepared statements (Database.fetch).
_DATASET_ROW = PreparedRead(
    "clipsearch_dataset_row", f"SELECT {_DATASET_COLUMNS}, {_DELETION_COLUMNS} FROM datasets WHERE name = $1"
)
_DATASET_ROW_NAMES = [column.strip() for column in f"{_DATASET_COLUMNS}, {_DELETION_COLUMNS}".split(",")]
_IMAGE_LOCATIONS = PreparedRead(
    "clipsearch_image_locations",
    "SELECT id, bucket, object_key, source_path, status FROM images WHERE id = ANY($1::int8[])",
)
# The folder index's rows of one segment (migration 005): its indexed images' ids, packed per folder.
_INDEX_SEGMENT_FOLDERS = (
    "INSERT INTO image_folders (dataset_id, folder, segment_id, ids)"
    " SELECT dataset_id, image_folder(object_key), segment_id, string_agg(int8send(id), ''::bytea ORDER BY id)"
    " FROM images WHERE segment_id = %s AND status = 'indexed' GROUP BY dataset_id, image_folder(object_key), segment_id"
)


def migrate(database: Database) -> list[str]:
    """Applies the migrations not yet recorded, in order, in one transaction; returns their names.

    Idempotent and safe to run concurrently: an advisory lock makes a second caller wait, then find
    everything applied.
    """
    scripts = sorted(
        (entry for entry in (resources.files("clipsearch") / "migrations").iterdir()
         if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    applied: list[str] = []
    with database.transaction() as connection:
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in connection.execute("SELECT version FROM schema_migrations")}
        for script in scripts:
            if script.name in done:
                continue
            connection.execute(script.read_text(encoding="utf-8"))
            connection.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (script.name,))
            applied.append(script.name)
    if applied:
        logger.info("applied migrations %s", applied)
    return applied


def _dataset(row: Mapping) -> Dataset:
    return Dataset(
        id=row["id"],
        name=row["name"],
        model_id=row["model_id"],
        index_version=row["index_version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _deletion(row: Mapping) -> DeletionProgress | None:
    if row["deletion_requested_at"] is None:
        return None
    return DeletionProgress(
        row["deletion_requested_at"], row["objects_deleted"], row["rows_deleted"], row["deletion_progress_at"]
    )


def _segment(row: Mapping) -> SegmentRef:
    return SegmentRef(row["id"], row["object_key"], row["vector_count"], row["index_type"])


class PostgresCatalog:
    def __init__(self, database: Database) -> None:
        self._database = database

    # --- as search reads it -----------------------------------------------------------------------

    def get_dataset(self, name: str) -> Dataset:
        """Raises DatasetDeleting for a dataset being deleted: to search and ingestion it is gone."""
        row = self._dataset_row(name)
        if row["deletion_requested_at"] is not None:
            raise DatasetDeleting(name)
        return _dataset(row)

    def _dataset_row(self, name: str) -> Mapping:
        validate_dataset_name(name)
        rows = self._database.fetch(_DATASET_ROW, name)
        if not rows:
            raise DatasetNotFound(name)
        return dict(zip(_DATASET_ROW_NAMES, rows[0]))

    def list_datasets(self) -> Sequence[DatasetSummary]:
        """Datasets being deleted included, with their progress."""
        with self._database.transaction() as connection:
            rows = connection.execute(
                f"SELECT {_DATASET_COLUMNS}, {_DELETION_COLUMNS} FROM datasets ORDER BY name"
            ).fetchall()
            counts = self._counts(connection, [row["id"] for row in rows])
        return [DatasetSummary(_dataset(row), counts[row["id"]], deletion=_deletion(row)) for row in rows]

    def summarize_dataset(self, name: str, failure_limit: int = 20) -> DatasetSummary:
        """A dataset being deleted too, with its progress."""
        row = self._dataset_row(name)
        dataset = _dataset(row)
        with self._database.transaction() as connection:
            counts = self._counts(connection, [dataset.id])[dataset.id]
            failures = [
                ImageFailure(row["object_key"], row["failure_reason"] or "", row["updated_at"])
                for row in connection.execute(
                    "SELECT object_key, failure_reason, updated_at FROM images"
                    " WHERE dataset_id = %s AND status = 'failed'"
                    " ORDER BY updated_at DESC, id DESC LIMIT %s",
                    (dataset.id, failure_limit),
                )
            ]
        return DatasetSummary(dataset, counts, failures, _deletion(row))

    @staticmethod
    def _counts(connection, dataset_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        counts = {dataset_id: dict.fromkeys(IMAGE_STATUSES, 0) for dataset_id in dataset_ids}
        for row in connection.execute(
            "SELECT dataset_id, status, count(*) AS n FROM images"
            " WHERE dataset_id = ANY(%s) GROUP BY dataset_id, status",
            (list(dataset_ids),),
        ):
            counts[row["dataset_id"]][row["status"]] = row["n"]
        return counts

    def live_segments(self, dataset_id: int) -> Sequence[SegmentRef]:
        with self._database.transaction() as connection:
            rows = connection.execute(
                "SELECT id, object_key, vector_count, index_type FROM segments"
                " WHERE dataset_id = %s AND retired_at IS NULL ORDER BY created_version, id",
                (dataset_id,),
            ).fetchall()
        return [_segment(row) for row in rows]

    def deleted_image_ids(self, dataset_id: int) -> set[int]:
        with self._database.transaction() as connection:
            rows = connection.execute(
                "SELECT i.id FROM images i JOIN segments s ON s.id = i.segment_id"
                " WHERE i.dataset_id = %s AND i.status = 'deleted' AND s.retired_at IS NULL",
                (dataset_id,),
            ).fetchall()
        return {row["id"] for row in rows}

    def image_locations(self, ids: Sequence[int]) -> Mapping[int, ImageLocation]:
        """Indexed images only. The status is checked here, not in SQL: `status = 'indexed'` matches the
        partial indexes of migration 004, and a table never analyzed yet (a bulk ingest, until autovacuum
        gets to it) was planned as a BitmapAnd that read every entry of images_indexed_by_time: 6-10 ms at
        100k rows instead of 0.15 ms. On the primary key alone the plan cannot drift with the statistics."""
        rows = self._database.fetch(_IMAGE_LOCATIONS, "{" + ",".join(str(int(image_id)) for image_id in ids) + "}")
        return {
            image_id: ImageLocation(image_id, bucket, key, source_path)
            for image_id, bucket, key, source_path, status in rows
            if status == "indexed"
        }

    def filtered_image_ids(
        self, dataset_id: int, key_prefix: str | None, since: datetime | None, until: datetime | None
    ) -> np.ndarray:
        """A folder prefix alone reads the folder index (migration 005); a time range, alone or with a prefix, the
        images' filter indexes (migration 004). Either way the ids come packed by the server as bytea of big-endian
        int64 (cheaper for it than an int8[]), read in binary, in one round trip outside a transaction.
        From the folder index they may hold ids of images deleted since their segment was written: see the port."""
        if key_prefix and since is None and until is None and _prefix_upper_bound(key_prefix) is not None:
            query, params = _folder_index_query(dataset_id, key_prefix)
        else:
            query, params = _image_rows_query(dataset_id, key_prefix, since, until)
        with self._database.read() as connection, connection.cursor(binary=True) as cursor:
            packed = cursor.execute(query, params).fetchall()
        return np.frombuffer(b"".join(row["ids"] or b"" for row in packed), dtype=">i8").astype(np.int64)

    def remove_dataset(self, name: str) -> DatasetRemoval:
        validate_dataset_name(name)
        with self._database.transaction() as connection:
            row = connection.execute(
                "SELECT id FROM datasets WHERE name = %s FOR UPDATE", (name,)
            ).fetchone()
            if row is None:
                raise DatasetNotFound(name)
            image_keys = [
                r["object_key"]
                for r in connection.execute(
                    "SELECT DISTINCT object_key FROM images WHERE dataset_id = %s ORDER BY object_key",
                    (row["id"],),
                )
            ]
            segment_keys = [
                r["object_key"]
                for r in connection.execute(
                    "SELECT object_key FROM segments WHERE dataset_id = %s ORDER BY object_key",
                    (row["id"],),
                )
            ]
            connection.execute("DELETE FROM datasets WHERE id = %s", (row["id"],))
        return DatasetRemoval(name, image_keys, segment_keys)

    # --- asynchronous deletion --------------------------------------------------------------------

    def request_deletion(self, name: str, create_missing: bool = False) -> tuple[DeletionTask, DeletionProgress]:
        validate_dataset_name(name)
        with self._database.transaction() as connection:
            if create_missing:  # model_id '': no image of it was ever embedded
                connection.execute(
                    "INSERT INTO datasets (name, model_id) VALUES (%s, '') ON CONFLICT (name) DO NOTHING", (name,)
                )
            row = connection.execute(
                "UPDATE datasets SET deletion_requested_at = coalesce(deletion_requested_at, now())"
                f" WHERE name = %s RETURNING id, {_DELETION_COLUMNS}",
                (name,),
            ).fetchone()
        if row is None:
            raise DatasetNotFound(name)
        return DeletionTask(name, row["id"]), _deletion(row)

    def claim_deletion(self, dataset_id: int, lease_seconds: int) -> datetime | None:
        with self._database.transaction() as connection:
            row = connection.execute(
                "UPDATE datasets SET deletion_lease_until = now() + make_interval(secs => %s)"
                f" WHERE id = %s AND {_DELETING}"
                " AND (deletion_lease_until IS NULL OR deletion_lease_until < now()) RETURNING deletion_requested_at",
                (lease_seconds, dataset_id),
            ).fetchone()
        return None if row is None else row["deletion_requested_at"]

    def record_deletion_progress(self, dataset_id: int, objects: int, rows: int, lease_seconds: int) -> None:
        with self._database.transaction() as connection:
            connection.execute(
                "UPDATE datasets SET objects_deleted = objects_deleted + %s, rows_deleted = rows_deleted + %s,"
                " deletion_progress_at = now(), deletion_lease_until = now() + make_interval(secs => %s)"
                f" WHERE id = %s AND {_DELETING}",
                (objects, rows, lease_seconds, dataset_id),
            )

    def release_deletion(self, dataset_id: int) -> None:
        with self._database.transaction() as connection:
            connection.execute(
                f"UPDATE datasets SET deletion_lease_until = NULL WHERE id = %s AND {_DELETING}",
                (dataset_id,),
            )

    def delete_image_rows(self, dataset_id: int, limit: int) -> int:
        with self._database.transaction() as connection:
            deleted = connection.execute(
                "DELETE FROM images WHERE id IN (SELECT i.id FROM images i JOIN datasets d ON d.id = i.dataset_id"
                " WHERE d.id = %s AND d.deletion_requested_at IS NOT NULL LIMIT %s)",
                (dataset_id, limit),
            ).rowcount
        return deleted

    def stalled_deletions(self, requested_before: datetime) -> Sequence[DeletionTask]:
        with self._database.transaction() as connection:
            rows = connection.execute(
                "SELECT id, name FROM datasets WHERE deletion_requested_at < %s"
                " AND (deletion_lease_until IS NULL OR deletion_lease_until < now()) ORDER BY id",
                (requested_before,),
            ).fetchall()
        return [DeletionTask(row["name"], row["id"]) for row in rows]

    # --- as ingestion writes it -------------------------------------------------------------------

    def ensure_dataset(self, name: str, model_id: str) -> Dataset:
        validate_dataset_name(name)
        with self._database.transaction() as connection:
            connection.execute(
                "INSERT INTO datasets (name, model_id) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, model_id),
            )
            row = connection.execute(
                f"SELECT {_DATASET_COLUMNS}, deletion_requested_at FROM datasets WHERE name = %s", (name,)
            ).fetchone()
        if row is None:
            raise TransientError(f"dataset {name!r} was deleted while it was being created")
        if row["deletion_requested_at"] is not None:  # its uploads wait (retried) until it is gone, then start a new one
            raise TransientError(f"dataset {name!r} is being deleted; its new images wait until it is gone")
        dataset = _dataset(row)
        if dataset.model_id != model_id:
            raise ModelMismatch(
                f"dataset {name!r} is embedded with model {dataset.model_id!r}, not {model_id!r}"
            )
        return dataset

    def claim_images(self, dataset_id: int, images: Sequence[NewImage]) -> list[ClaimedImage | None]:
        """One statement for the whole list: one round trip per chunk, not two per image.

        Rows are inserted in (key, etag) order, so two batches claiming overlapping images wait for
        each other instead of deadlocking. Where the claimed version is already live, the fetch just
        proved the bucket holds that version: pending rows of the key's other etags can then never be
        fetched again (a crashed batch's claim), so they are retired instead of waiting forever.
        Raises DatasetNotFound when the dataset was deleted meanwhile.
        """
        distinct = list({(image.key, image.etag): image for image in images}.values())
        keys = [image.key for image in distinct]
        etags = [image.etag for image in distinct]
        with self._database.transaction() as connection:
            try:
                rows = self._insert_claims(connection, dataset_id, distinct)
            except psycopg.errors.ForeignKeyViolation as error:
                raise DatasetNotFound(f"#{dataset_id}") from error
            retired = connection.execute(
                "UPDATE images p SET status = 'deleted', updated_at = now(),"
                "  deleted_version = (SELECT index_version FROM datasets WHERE id = p.dataset_id)"
                " FROM unnest(%s::text[], %s::text[]) AS t(object_key, etag)"
                " WHERE p.dataset_id = %s AND p.object_key = t.object_key AND p.etag <> t.etag"
                " AND p.status = 'pending' AND EXISTS ("
                "   SELECT 1 FROM images l WHERE l.dataset_id = p.dataset_id"
                "   AND l.object_key = t.object_key AND l.etag = t.etag AND l.status IN ('indexed', 'failed'))"
                " RETURNING p.object_key, p.etag",
                (keys, etags, dataset_id),
            ).fetchall()
        for row in retired:
            logger.info("retired the unfetchable pending claim of %r at etag %r", row["object_key"], row["etag"])
        claimed = {
            (row["object_key"], row["etag"]): ClaimedImage(row["id"], row["object_key"], row["etag"], row["attempts"])
            for row in rows
        }
        return [claimed.get((image.key, image.etag)) for image in images]

    @staticmethod
    def _insert_claims(connection, dataset_id: int, distinct: Sequence[NewImage]) -> list[Mapping]:
        return connection.execute(
            "WITH incoming AS ("
            "  SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
            "    %s::bigint[]) AS t(bucket, object_key, etag, source_path, sha256, byte_size))"
            " INSERT INTO images"
            " (dataset_id, bucket, object_key, etag, source_path, sha256, byte_size, attempts)"
            " SELECT %s, i.bucket, i.object_key, i.etag, i.source_path, i.sha256, i.byte_size, 1"
            " FROM incoming i WHERE NOT EXISTS ("
            "   SELECT 1 FROM images l WHERE l.dataset_id = %s AND l.object_key = i.object_key"
            "   AND l.etag = i.etag AND l.status IN ('indexed', 'failed'))"
            " ORDER BY i.object_key, i.etag"
            " ON CONFLICT (dataset_id, object_key, etag) WHERE status = 'pending'"
            " DO UPDATE SET attempts = images.attempts + 1, updated_at = now()"
            " RETURNING id, object_key, etag, attempts",
            (
                [image.bucket for image in distinct],
                [image.key for image in distinct],
                [image.etag for image in distinct],
                [image.source_path for image in distinct],
                [image.sha256 for image in distinct],
                [image.byte_size for image in distinct],
                dataset_id,
                dataset_id,
            ),
        ).fetchall()

    def commit_batch(
        self,
        dataset_id: int,
        segment: NewSegment | None,
        indexed: Sequence[IndexedImage],
        failed: Sequence[FailedImage],
    ) -> BatchCommit:
        """Raises DatasetNotFound when the dataset was deleted meanwhile (DatasetDeleting: is being deleted)."""
        ids = [image.id for image in indexed] + [image.id for image in failed]
        refused: frozenset[int] = frozenset()
        with self._database.transaction() as connection:
            # The dataset row lock serializes commits (and compactions) of one dataset.
            bumped = connection.execute(
                "UPDATE datasets SET index_version = index_version + 1, updated_at = now()"
                " WHERE id = %s RETURNING index_version, name, deletion_requested_at",
                (dataset_id,),
            ).fetchone()
            if bumped is None:
                raise DatasetNotFound(f"#{dataset_id}")
            if bumped["deletion_requested_at"] is not None:
                raise DatasetDeleting(bumped["name"])
            version = bumped["index_version"]
            pending = {
                row["id"]: row["object_key"]
                for row in connection.execute(
                    "SELECT id, object_key FROM images WHERE id = ANY(%s) AND status = 'pending'"
                    " FOR UPDATE",
                    (ids,),
                )
            }
            # A claim older than the live row of its key carries older content (its batch fetched
            # the object before the newer upload): it must not replace that row.
            outdated = [
                row["id"]
                for row in connection.execute(
                    "SELECT p.id FROM images p JOIN images l ON l.dataset_id = p.dataset_id"
                    " AND l.object_key = p.object_key AND l.status IN ('indexed', 'failed')"
                    " AND l.id > p.id WHERE p.id = ANY(%s)",
                    (list(pending),),
                )
            ]
            refused = (frozenset(ids) - pending.keys()) | frozenset(outdated)
            if outdated:
                connection.execute(
                    "UPDATE images SET status = 'deleted', deleted_version = %s, updated_at = now()"
                    " WHERE id = ANY(%s)",
                    (version, outdated),
                )
            elif refused:
                raise psycopg.Rollback()
            else:
                self._apply_batch(connection, dataset_id, version, segment, indexed, failed,
                                  sorted(set(pending.values())), ids)
        if refused:
            return BatchCommit(None, refused)
        return BatchCommit(version)

    @staticmethod
    def _apply_batch(connection, dataset_id, version, segment, indexed, failed, keys, ids) -> None:
        """Supersedes the keys' live rows, registers the segment, and settles the claimed rows.

        Older pending claims of the same keys are retired too: committed, they would be refused as
        older than this row, and their batch may have crashed, leaving nobody to settle them.
        """
        connection.execute(
            "UPDATE images SET status = 'deleted', deleted_version = %s, updated_at = now()"
            " WHERE dataset_id = %s AND object_key = ANY(%s) AND status IN ('indexed', 'failed')",
            (version, dataset_id, keys),
        )
        connection.execute(
            "UPDATE images p SET status = 'deleted', deleted_version = %s, updated_at = now()"
            " FROM images c WHERE c.id = ANY(%s) AND p.dataset_id = c.dataset_id"
            " AND p.object_key = c.object_key AND p.status = 'pending' AND p.id < c.id",
            (version, ids),
        )
        if segment is not None:
            connection.execute(
                "INSERT INTO segments (id, dataset_id, object_key, vector_count, index_type,"
                " created_version) VALUES (%s, %s, %s, %s, %s, %s)",
                (segment.id, dataset_id, segment.object_key, segment.vector_count, segment.index_type,
                 version),
            )
        with connection.cursor() as cursor:
            if indexed:
                cursor.executemany(
                    "UPDATE images SET status = 'indexed', segment_id = %s, width = %s, height = %s,"
                    " failure_reason = NULL, updated_at = now() WHERE id = %s",
                    [(segment.id, image.width, image.height, image.id) for image in indexed],
                )
            if failed:
                cursor.executemany(
                    "UPDATE images SET status = 'failed', failure_reason = %s, updated_at = now()"
                    " WHERE id = %s",
                    [(image.reason, image.id) for image in failed],
                )
        if segment is not None and indexed:
            connection.execute(_INDEX_SEGMENT_FOLDERS, (segment.id,))

    def remove_images(self, dataset: str, key: str, keep_etag: str | None) -> int:
        with self._database.transaction() as connection:
            # A dataset being deleted loses every row at once: marking them one by one is wasted work.
            row = connection.execute(
                "SELECT id FROM datasets WHERE name = %s AND deletion_requested_at IS NULL", (dataset,)
            ).fetchone()
            if row is None:
                return 0
            return self._remove(
                connection,
                row["id"],
                "object_key = %s AND etag IS DISTINCT FROM %s",
                (key, keep_etag),
            )

    def remove_image_ids(self, dataset_id: int, ids: Sequence[int]) -> int:
        with self._database.transaction() as connection:
            return self._remove(connection, dataset_id, "id = ANY(%s)", (list(ids),))

    @staticmethod
    def _remove(connection, dataset_id: int, condition: str, params: tuple) -> int:
        """Marks matching live or pending rows deleted; bumps index_version only when something changed."""
        connection.execute("SELECT 1 FROM datasets WHERE id = %s FOR UPDATE", (dataset_id,))
        victims = connection.execute(
            f"SELECT id FROM images WHERE dataset_id = %s AND status <> 'deleted' AND {condition}"
            " FOR UPDATE",
            (dataset_id, *params),
        ).fetchall()
        if not victims:
            return 0
        version = connection.execute(
            "UPDATE datasets SET index_version = index_version + 1, updated_at = now()"
            " WHERE id = %s RETURNING index_version",
            (dataset_id,),
        ).fetchone()["index_version"]
        connection.execute(
            "UPDATE images SET status = 'deleted', deleted_version = %s, updated_at = now()"
            " WHERE id = ANY(%s)",
            (version, [row["id"] for row in victims]),
        )
        return len(victims)

    def live_images(self, dataset: str) -> Mapping[str, LiveImage]:
        with self._database.transaction() as connection:
            rows = connection.execute(
                "SELECT i.id, i.object_key, i.etag, i.status FROM images i"
                " JOIN datasets d ON d.id = i.dataset_id"
                " WHERE d.name = %s AND i.status <> 'deleted' ORDER BY i.id",
                (dataset,),
            ).fetchall()
        # Ordered by id, so a later pending version of a key wins over its live predecessor.
        return {row["object_key"]: LiveImage(row["id"], row["object_key"], row["etag"], row["status"])
                for row in rows}

    # --- as compaction writes it ------------------------------------------------------------------

    def segment_members(self, dataset_id: int) -> Mapping[int, str]:
        with self._database.transaction() as connection:
            rows = connection.execute(
                "SELECT id, segment_id FROM images WHERE dataset_id = %s AND status = 'indexed'",
                (dataset_id,),
            ).fetchall()
        return {row["id"]: row["segment_id"] for row in rows}

    def publish_compaction(
        self, dataset_id: int, merged: NewSegment, replaced: Sequence[str], kept_ids: Sequence[int]
    ) -> int | None:
        with self._database.transaction() as connection:
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (dataset_id,))
            still_live = connection.execute(
                "SELECT count(*) AS n FROM segments WHERE id = ANY(%s) AND retired_at IS NULL",
                (list(replaced),),
            ).fetchone()["n"]
            if still_live != len(replaced):
                return None
            published = connection.execute(
                "UPDATE datasets SET index_version = index_version + 1, updated_at = now()"
                " WHERE id = %s AND deletion_requested_at IS NULL RETURNING index_version",
                (dataset_id,),
            ).fetchone()
            if published is None:  # deleted, or being deleted, since the compaction began: its object goes
                return None
            version = published["index_version"]
            connection.execute(
                "INSERT INTO segments (id, dataset_id, object_key, vector_count, index_type,"
                " created_version) VALUES (%s, %s, %s, %s, %s, %s)",
                (merged.id, dataset_id, merged.object_key, merged.vector_count, merged.index_type,
                 version),
            )
            connection.execute(
                "UPDATE segments SET retired_at = now(), retired_version = %s WHERE id = ANY(%s)",
                (version, list(replaced)),
            )
            connection.execute(
                "UPDATE images SET segment_id = %s WHERE segment_id = ANY(%s) AND id = ANY(%s)",
                (merged.id, list(replaced), list(kept_ids)),
            )
            connection.execute("DELETE FROM image_folders WHERE segment_id = ANY(%s)", (list(replaced),))
            connection.execute(_INDEX_SEGMENT_FOLDERS, (merged.id,))
        return version

    def retired_segments(self, dataset_id: int, retired_before: datetime) -> Sequence[SegmentRef]:
        with self._database.transaction() as connection:
            rows = connection.execute(
                "SELECT id, object_key, vector_count, index_type FROM segments"
                " WHERE dataset_id = %s AND retired_at < %s ORDER BY id",
                (dataset_id, retired_before),
            ).fetchall()
        return [_segment(row) for row in rows]

    def forget_segments(self, ids: Sequence[str]) -> None:
        with self._database.transaction() as connection:
            connection.execute(
                "DELETE FROM segments WHERE id = ANY(%s) AND retired_at IS NOT NULL", (list(ids),)
            )

    def segment_keys(self, dataset_id: int) -> set[str]:
        with self._database.transaction() as connection:
            rows = connection.execute(
                "SELECT object_key FROM segments WHERE dataset_id = %s", (dataset_id,)
            ).fetchall()
        return {row["object_key"] for row in rows}


def _prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix`, in code point order (which is the
    byte order of UTF-8, COLLATE "C"): its last character raised by one, dropping maximal ones; None
    when there is none."""
    characters = list(prefix)
    while characters:
        last = ord(characters.pop())
        if last < sys.maxunicode:
            following = 0xE000 if 0xD800 <= last + 1 <= 0xDFFF else last + 1  # surrogates are not characters
            return "".join(characters) + chr(following)
    return None


def _image_rows_query(
    dataset_id: int, key_prefix: str | None, since: datetime | None, until: datetime | None
) -> tuple[str, list]:
    """Migration 004's index-only scans: a key range, not LIKE (which re-checked every row). 10k of 100k ids
    (benchmarks/filtered_search.py): PostgreSQL 3.8 ms + client 0.8 ms of CPU, the index scan alone 2.6 ms."""
    conditions, params = ["dataset_id = %s", "status = 'indexed'"], [dataset_id]
    if key_prefix:
        conditions.append("object_key COLLATE \"C\" >= %s")
        params.append(key_prefix)
        upper = _prefix_upper_bound(key_prefix)
        if upper is not None:
            conditions.append("object_key COLLATE \"C\" < %s")
            params.append(upper)
    if since is not None:
        conditions.append("created_at >= %s")
        params.append(since)
    if until is not None:
        conditions.append("created_at < %s")
        params.append(until)
    return f"SELECT string_agg(int8send(id), ''::bytea) AS ids FROM images WHERE {' AND '.join(conditions)}", params


def _folder_index_query(dataset_id: int, key_prefix: str) -> tuple[str, list]:
    """The ids under `key_prefix` from the folder index: migration 005's image_ids_under."""
    folder_length = key_prefix.rfind("/") + 1
    return ("SELECT ids FROM image_ids_under(%s, %s, %s, %s) AS ids",
            [dataset_id, key_prefix, _prefix_upper_bound(key_prefix), folder_length])
