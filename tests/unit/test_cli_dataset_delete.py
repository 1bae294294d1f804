"""`clipsearch dataset delete`: accepted (202), then polled with progress until the dataset is gone, or --no-wait."""

from __future__ import annotations

import argparse

import pytest
from clipsearch.errors import ClipsearchError
from clipsearch_tools.cli import search_commands
from clipsearch_tools.client import ApiError

pytestmark = pytest.mark.unit


def progress(objects: int, rows: int = 0) -> dict:
    return {"requested_at": "2026-11-29T09:00:00Z", "objects_deleted": objects, "rows_deleted": rows,
            "progress_at": None}


class DeletingApi:
    """The datasets API while a worker deletes: `polls` answers 'deleting' with growing progress, then 404."""

    def __init__(self, polls: int) -> None:
        self.polls, self.gets, self.deletes = polls, 0, 0

    def delete_dataset(self, name: str) -> dict:
        self.deletes += 1
        return {"dataset": name, "status": "deleting", "location": f"/datasets/{name}", "deletion": progress(0)}

    def get_dataset(self, name: str) -> dict:
        self.gets += 1
        if self.gets > self.polls:
            raise ApiError(404, "dataset_not_found", f"dataset {name!r} does not exist")
        return {"name": name, "status": "deleting", "deletion": progress(1000 * self.gets)}


def arguments(**options) -> argparse.Namespace:
    return argparse.Namespace(**{"name": "pets", "yes": True, "json": False, "no_wait": False, "timeout": 60, **options})


@pytest.fixture(autouse=True)
def no_sleeping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_commands, "DELETION_POLL_SECONDS", 0)


def test_delete_polls_with_progress_until_the_dataset_is_gone(capsys) -> None:
    api = DeletingApi(polls=2)

    assert search_commands.delete_dataset(arguments(), api) == 0

    out, err = capsys.readouterr()
    assert api.gets == 3 and out.strip() == "deleted dataset pets: its images, thumbnails, segments and catalog rows"
    assert [line.split(": ")[1] for line in err.splitlines()] == [
        f"{objects} objects and 0 catalog rows removed so far" for objects in (0, 1000, 2000)]


def test_no_wait_returns_once_accepted(capsys) -> None:
    api = DeletingApi(polls=5)

    assert search_commands.delete_dataset(arguments(no_wait=True), api) == 0

    assert api.gets == 0 and "is being deleted" in capsys.readouterr().out


def test_a_deletion_outlasting_the_timeout_is_an_error_that_says_it_goes_on() -> None:
    with pytest.raises(ClipsearchError, match="still being deleted after 0 s"):
        search_commands.delete_dataset(arguments(timeout=0), DeletingApi(polls=5))


def test_another_api_error_while_polling_is_not_taken_for_done() -> None:
    class Unavailable(DeletingApi):
        def get_dataset(self, name: str) -> dict:
            raise ApiError(503, "unavailable", "retry shortly")

    with pytest.raises(ApiError):
        search_commands.delete_dataset(arguments(), Unavailable(polls=1))
