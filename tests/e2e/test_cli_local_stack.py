"""The product as a user meets it: `clipsearch` commands and the HTTP API against a real local stack.

One stack (tiny random-weight model) serves the whole module; the tests run in order, as a session
of a user would: ingest, search, delete, add, restart, evaluate, then the documented errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from clipsearch.aws import aws_client
from clipsearch_tools.cli.evaluate import label_of

pytestmark = pytest.mark.e2e

CLIPSEARCH = Path(sys.executable).parent / "clipsearch"
DATASET = "photos"
NOT_A_JPEG = b"this is text, not a JPEG"


class Cli:
    """Runs `clipsearch` in a subprocess with the stack home in its environment."""

    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "CLIPSEARCH_HOME": str(home)}
        for name in ("CLIPSEARCH_API_URL", "CLIPSEARCH_BUCKET"):
            self.env.pop(name, None)

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(CLIPSEARCH), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, check=False,
        )

    def json(self, *args: str) -> dict:
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, seed_eval_dir: Path) -> Path:
    """A copy of seed-eval train/ that the tests change (delete and add files)."""
    folder = tmp_path_factory.mktemp("photos") / "train"
    shutil.copytree(seed_eval_dir / "train", folder)
    return folder


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_model_dir: Path):
    home = tmp_path_factory.mktemp("stack-home")
    cli = Cli(home)
    started = cli.run("local", "up", "--model-dir", str(tiny_model_dir), "--json", timeout=400)
    assert started.returncode == 0, started.stderr
    cli.model_dir = tiny_model_dir
    try:
        yield cli
    finally:
        stopped = cli.run("local", "down")
        assert stopped.returncode == 0, stopped.stderr


def _state(cli: Cli) -> dict:
    return json.loads((Path(cli.env["CLIPSEARCH_HOME"]) / "state.json").read_text())


def _s3(cli: Cli):
    state = _state(cli)
    return aws_client(
        "s3", state["region"], state["s3_endpoint_url"], state["access_key_id"], state["secret_access_key"],
    ), state["bucket"]


def _keys_under(cli: Cli, prefix: str) -> list[str]:
    s3, bucket = _s3(cli)
    return [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])]


def _single_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def test_status_reports_every_part_with_the_api_url(cli: Cli):
    status = cli.json("local", "status")
    assert status["api_url"].startswith("http://127.0.0.1:")
    assert status["healthy"] is True
    assert set(status["parts"]) >= {"supervisor", "object_storage", "queue", "postgres", "api", "model"}
    assert status["parts"]["model"]["random_weights"] is True


def test_ingest_uploads_every_photo_and_waits_until_indexed(cli: Cli, photos: Path):
    s3, bucket = _s3(cli)
    # Objects that are not images (put there by anyone) are never indexed: ingest must not wait for them.
    s3.put_object(Bucket=bucket, Key=f"datasets/{DATASET}/notes/about.txt", Body=b"not an image")
    (photos / "readme.txt").write_text("the photos of the evaluation set\n")
    report = cli.json("ingest", str(photos), "--dataset", DATASET, "--timeout", "180")
    assert (report["found"], report["uploaded"], report["skipped"]) == (100, 100, 0)
    assert report["skipped_not_images"] == 1
    assert report["indexed"] == 100
    assert (report["failed"], report["failures_not_listed"]) == ([], 0)
    head = s3.head_object(Bucket=bucket, Key=f"datasets/{DATASET}/beach_1.jpeg")
    assert head["Metadata"]["source-path"] == str((photos / "beach_1.jpeg").resolve())
    assert f"datasets/{DATASET}/readme.txt" not in _keys_under(cli, f"datasets/{DATASET}/")


def test_reingest_uploads_only_what_changed(cli: Cli, photos: Path):
    report = cli.json("ingest", str(photos), "--dataset", DATASET)
    assert (report["uploaded"], report["skipped"], report["indexed"]) == (0, 100, 100)


def test_ingest_reports_only_its_own_failures_and_says_when_more_exist(cli: Cli, photos: Path, tmp_path: Path):
    dataset = "mixed"
    s3, bucket = _s3(cli)
    earlier = [f"datasets/{dataset}/earlier/bad_{index:02d}.jpg" for index in range(20)]  # the API lists 20
    for key in earlier:
        s3.put_object(Bucket=bucket, Key=key, Body=NOT_A_JPEG)
    deadline = time.monotonic() + 120
    while _failed_count(cli, dataset) < len(earlier):
        assert time.monotonic() < deadline, "the earlier broken uploads were not marked failed after 120 s"
        time.sleep(1)
    folder = tmp_path / dataset
    folder.mkdir()
    for name in ("beach_1.jpeg", "ship_1.jpeg"):
        shutil.copy(photos / name, folder / name)
    (folder / "broken.jpg").write_bytes(NOT_A_JPEG)
    (folder / "notes.txt").write_text("not an image\n")

    ingested = cli.run("ingest", str(folder), "--dataset", dataset, "--json", "--timeout", "120")
    assert ingested.returncode == 3, ingested.stderr  # some images failed
    report = json.loads(ingested.stdout)
    assert (report["found"], report["uploaded"], report["skipped_not_images"], report["indexed"]) == (3, 3, 1, 2)
    assert [failure["path"] for failure in report["failed"]] == [str(folder / "broken.jpg")]
    assert report["failed"][0]["reason"]
    assert report["failures_not_listed"] == 1  # 21 failed, the 20 most recent listed

    again = cli.run("ingest", str(folder), "--dataset", dataset, "--timeout", "120")
    assert again.returncode == 3, again.stderr
    assert f"  failed: {folder / 'broken.jpg'}: " in again.stdout
    assert "1 more failed images in the dataset, not listed" in again.stdout
    assert "earlier/bad_" not in again.stdout
    assert cli.json("dataset", "delete", dataset, "--yes")["dataset"] == dataset


def _failed_count(cli: Cli, dataset: str) -> int:
    shown = cli.run("dataset", "show", dataset, "--json")
    return json.loads(shown.stdout)["counts"].get("failed", 0) if shown.returncode == 0 else 0


def test_search_text_prints_rank_score_and_path(cli: Cli, photos: Path):
    result = cli.run("search", "text", "a sunny beach", "--dataset", DATASET, "-k", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "path"]
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert all(Path(row[2]).parent == photos.resolve() for row in rows)
    assert "RANDOM weights" in result.stderr  # the tiny model is labelled as what it is
    response = cli.json("search", "text", "a sunny beach", "--dataset", DATASET)
    assert len(response["results"]) == 5  # k defaults to 5
    scores = [hit["score"] for hit in response["results"]]
    assert scores == sorted(scores, reverse=True)


def test_search_image_with_a_val_photo_through_cli_and_http_api(cli: Cli, seed_eval_dir: Path):
    query = min((seed_eval_dir / "val").glob("*.jp*g"))
    response = cli.json("search", "image", str(query), "--dataset", DATASET, "-k", "3")
    assert len(response["results"]) == 3
    api_url = _state(cli)["api_url"]
    request = urllib.request.Request(
        f"{api_url}/datasets/{DATASET}/search/image?k=3", data=query.read_bytes(), method="POST",
        headers={"content-type": "image/jpeg"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        direct = json.loads(answer.read())
    assert [hit["key"] for hit in direct["results"]] == [hit["key"] for hit in response["results"]]


def test_a_deleted_photo_vanishes_from_results(cli: Cli, photos: Path):
    victim = photos / "ship_2.jpeg"
    before = cli.json("search", "image", str(victim), "--dataset", DATASET, "-k", "1")
    assert before["results"][0]["key"] == f"datasets/{DATASET}/ship_2.jpeg"
    s3, bucket = _s3(cli)
    s3.delete_object(Bucket=bucket, Key=f"datasets/{DATASET}/ship_2.jpeg")  # as `aws s3 rm` would
    query = victim.read_bytes()
    victim.unlink()
    deadline = time.monotonic() + 120
    while True:
        keys = [hit["key"] for hit in _search_bytes(cli, query, 5)["results"]]
        if f"datasets/{DATASET}/ship_2.jpeg" not in keys:
            break
        assert time.monotonic() < deadline, "the deleted photo is still found after 120 s"
        time.sleep(1)
    assert cli.json("dataset", "show", DATASET)["counts"]["indexed"] == 99


def test_added_photos_appear_in_results(cli: Cli, photos: Path, seed_eval_dir: Path):
    added = sorted((seed_eval_dir / "val").glob("*.jp*g"))[:2]
    (photos / "new").mkdir()
    for index, source in enumerate(added):
        shutil.copy(source, photos / "new" / f"added_{index}.jpeg")
    report = cli.json("ingest", str(photos), "--dataset", DATASET)
    assert (report["uploaded"], report["skipped"], report["indexed"]) == (2, 99, 101)
    found = cli.json("search", "image", str(photos / "new" / "added_1.jpeg"), "--dataset", DATASET, "-k", "1")
    assert found["results"][0]["key"] == f"datasets/{DATASET}/new/added_1.jpeg"
    assert found["results"][0]["score"] > 0.999


def test_restart_keeps_the_dataset_searchable(cli: Cli, photos: Path):
    before = cli.json("search", "text", "a ship at sea", "--dataset", DATASET, "-k", "4")
    stopped = cli.run("local", "down")
    assert stopped.returncode == 0, stopped.stderr
    assert cli.run("local", "status").returncode != 0
    started = cli.run("local", "up", "--model-dir", str(cli.model_dir), timeout=400)
    assert started.returncode == 0, started.stderr
    after = cli.json("search", "text", "a ship at sea", "--dataset", DATASET, "-k", "4")
    assert [hit["key"] for hit in after["results"]] == [hit["key"] for hit in before["results"]]
    assert cli.json("dataset", "show", DATASET)["counts"]["indexed"] == 101


def test_sync_finds_nothing_missing_after_events(cli: Cli, photos: Path):
    report = cli.json("sync", "--dataset", DATASET)
    assert report["scanned"] == 101
    assert report["enqueued"] == 0
    assert report["indexed"] == 101


def test_evaluate_reports_precision_and_self_retrieval(cli: Cli, seed_eval_dir: Path):
    queries = sorted((seed_eval_dir / "val").glob("*.jp*g"))
    evaluation = cli.json("evaluate", "--dataset", DATASET, "--queries", str(seed_eval_dir / "val"))
    assert evaluation["queries"] == len(queries)
    assert evaluation["dataset_images"] == 101
    # Every indexed image's own vector is its nearest neighbour, whatever the model's weights.
    assert (evaluation["hits_at_1"], evaluation["hits_at_5"]) == (1.0, 1.0)
    # Precision@1 again, from the top hit of each query through the HTTP API.
    top_labels = [label_of(_search_bytes(cli, query.read_bytes(), 1)["results"][0]["key"]) for query in queries]
    expected = sum(label == label_of(query.name) for label, query in zip(top_labels, queries)) / len(queries)
    assert evaluation["precision_at_1"] == round(expected, 4)


def test_documented_errors_reach_the_user_as_one_line(cli: Cli, photos: Path, tmp_path: Path):
    unknown = _single_error_line(cli.run("search", "text", "x", "--dataset", "no-such-dataset"))
    assert "no-such-dataset" in unknown and "does not exist" in unknown
    bad_k = _single_error_line(cli.run("search", "text", "x", "--dataset", DATASET, "-k", "0"))
    assert bad_k == "error: body.k: Input should be greater than or equal to 1"
    assert "whole number" in _single_error_line(cli.run("search", "text", "x", "--dataset", DATASET, "-k", "many"))
    missing = _single_error_line(cli.run("search", "image", str(tmp_path / "nope.jpg"), "--dataset", DATASET))
    assert "not found" in missing
    assert "not a folder" in _single_error_line(cli.run("ingest", str(tmp_path / "nothing"), "--dataset", DATASET))
    assert "invalid dataset name" in _single_error_line(cli.run("ingest", str(photos), "--dataset", "../x"))
    elsewhere = Cli(tmp_path / "no-stack")
    assert "no local stack is running" in _single_error_line(elsewhere.run("datasets"))


def test_delete_dataset_needs_confirmation_then_removes_it(cli: Cli, photos: Path):
    refused = _single_error_line(cli.run("dataset", "delete", DATASET))
    assert "--yes" in refused
    assert _keys_under(cli, f"indexes/{DATASET}/")  # the dataset's segments, until the delete
    deleted = cli.json("dataset", "delete", DATASET, "--yes")  # 202, then polled until the worker is done
    assert (deleted["dataset"], deleted["status"]) == (DATASET, "deleted")
    assert {"requested_at", "objects_deleted", "rows_deleted"} <= set(deleted["last_progress"])  # the last poll's
    assert "does not exist" in _single_error_line(cli.run("dataset", "show", DATASET))
    assert DATASET not in [item["name"] for item in cli.json("datasets")["datasets"]]
    assert _keys_under(cli, f"datasets/{DATASET}/") == []  # the images, and the text file beside them
    assert _keys_under(cli, f"indexes/{DATASET}/") == []


def _search_bytes(cli: Cli, image: bytes, k: int) -> dict:
    request = urllib.request.Request(
        f"{_state(cli)['api_url']}/datasets/{DATASET}/search/image?k={k}", data=image, method="POST",
        headers={"content-type": "image/jpeg"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())
