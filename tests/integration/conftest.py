"""Fixtures the catalog's integration tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
from clipsearch.adapters.postgres_connection import Database


@pytest.fixture
def catalog(database_url: str) -> Iterator[PostgresCatalog]:
    """The catalog over a fresh database with every migration applied (a module may define its own)."""
    database = Database(database_url)
    migrate(database)
    yield PostgresCatalog(database)
    database.close()
