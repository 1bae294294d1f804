"""Database: a connection the server ended while it sat idle (a restart, an outage) is replaced before use.

A warm function holds its connection between requests; after PostgreSQL restarts, its first request must
not fail (503) because of a connection that died while nobody used it.
"""

from __future__ import annotations

import time
from datetime import datetime

import psycopg
import pytest
from clipsearch.adapters.postgres_connection import Database, PreparedRead
from clipsearch.errors import CatalogError

pytestmark = pytest.mark.integration


def _backend_pid(database: Database) -> int:
    with database.transaction() as connection:
        return connection.execute("SELECT pg_backend_pid()").fetchone()["pg_backend_pid"]


def test_a_connection_the_server_ended_while_idle_is_replaced_before_the_next_transaction(database_url: str):
    database = Database(database_url)
    first = _backend_pid(database)
    with psycopg.connect(database_url, autocommit=True) as admin:
        # What a fast shutdown does to every session: FATAL "terminating connection due to administrator command".
        assert admin.execute("SELECT pg_terminate_backend(%s)", (first,)).fetchone()[0]
        deadline = time.monotonic() + 5
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (first,)).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    second = _backend_pid(database)  # failed with TransientError (a 503 for the caller) before the fix

    assert second != first
    database.close()


def test_a_live_idle_connection_is_kept(database_url: str):
    database = Database(database_url)
    first = _backend_pid(database)
    time.sleep(0.2)
    assert _backend_pid(database) == first
    database.close()


BACKEND = PreparedRead("test_backend", "SELECT pg_backend_pid(), $1::int8[], now(), NULL::text")


def test_a_prepared_read_gives_python_values_and_is_prepared_again_on_a_replacement_connection(database_url: str):
    database = Database(database_url)
    pid, numbers, now, nothing = database.fetch(BACKEND, "{3,1,2}")[0]
    assert numbers == [3, 1, 2] and isinstance(now, datetime) and now.tzinfo is not None and nothing is None
    with database.read() as connection:
        prepared = [row["name"] for row in connection.execute("SELECT name FROM pg_prepared_statements")]
    assert prepared.count("test_backend") == 1
    assert database.fetch(BACKEND, "{}")[0][0] == pid  # the same connection, the statement not prepared twice
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 5
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    new_pid, numbers, _, _ = database.fetch(BACKEND, "{4}")[0]  # on a new connection, prepared there again
    assert new_pid != pid and numbers == [4]
    database.close()


def test_a_failing_prepared_read_is_a_catalog_error_and_leaves_the_connection_usable(database_url: str):
    database = Database(database_url)
    pid = database.fetch(BACKEND, "{}")[0][0]
    with pytest.raises(CatalogError, match="division by zero"):
        database.fetch(PreparedRead("test_divide", "SELECT 1 / $1::int"), "0")
    with pytest.raises(CatalogError, match="no_such_table"):
        database.fetch(PreparedRead("test_missing", "SELECT * FROM no_such_table WHERE id = $1::int"), "1")
    assert database.fetch(PreparedRead("test_divide", "SELECT 1 / $1::int"), "1") == [(1,)]
    assert database.fetch(BACKEND, "{}")[0][0] == pid
    database.close()


def test_a_prepared_read_survives_psycopg_deallocating_every_statement_after_a_rollback(database_url: str):
    """psycopg prepares a query it ran five times, and from then on sends DEALLOCATE ALL after each rollback."""
    database = Database(database_url)
    pid = database.fetch(BACKEND, "{1}")[0][0]
    for _ in range(6):
        with database.transaction() as connection:
            connection.execute("SELECT %s::int", (1,))
    with pytest.raises(ValueError), database.transaction() as connection:
        connection.execute("SELECT 1")
        raise ValueError("rolled back")
    with database.read() as connection:
        assert connection.execute("SELECT count(*) AS n FROM pg_prepared_statements").fetchone()["n"] == 0

    assert database.fetch(BACKEND, "{2}")[0][:2] == (pid, [2])  # prepared again on the same connection
    database.close()
