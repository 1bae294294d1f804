"""Database: a connection the server ended while it sat idle (a restart, an outage) is replaced before use.

A warm function holds its connection between requests; after PostgreSQL restarts, its first request must
not fail (503) because of a connection that died while nobody used it.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from clipsearch.adapters.postgres_connection import Database

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
