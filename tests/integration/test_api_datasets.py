"""The datasets function driven with HTTP API v2 events: list, describe (with failures), delete everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from http_events import FUNCTIONS
from search_stack import MODEL_ID, SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration


def bucket_keys(stack: SearchStack, prefix: str) -> set[str]:
    return {info.key for info in stack.store.list(prefix)}


def test_list_and_describe_datasets(stack: SearchStack, seed_eval_photos: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    stack.index("alpha", seed_eval_photos[:3] + [broken])
    stack.index("beta", seed_eval_photos[3:5])

    status, listing = stack.call(stack.datasets, "list_datasets")
    detail_status, alpha = stack.call(stack.datasets, "get_dataset", dataset="alpha")

    assert status == 200 and [entry["name"] for entry in listing["datasets"]] == ["alpha", "beta"]
    beta = listing["datasets"][1]
    assert beta["model"] == MODEL_ID and beta["index_version"] == 1
    assert beta["counts"] == {"pending": 0, "indexed": 2, "failed": 0, "deleted": 0}
    assert detail_status == 200
    assert alpha["counts"] == {"pending": 0, "indexed": 3, "failed": 1, "deleted": 0}
    assert [failure["key"] for failure in alpha["recent_failures"]] == ["datasets/alpha/broken.jpg"]
    assert "not a recognizable image" in alpha["recent_failures"][0]["reason"]
    assert alpha["updated_at"] >= alpha["created_at"]


def test_delete_removes_catalog_rows_segments_and_images(stack: SearchStack, seed_eval_photos: list[Path]) -> None:
    stack.index("alpha", seed_eval_photos[:3])
    stack.index("alpha", seed_eval_photos[3:5])
    stack.index("beta", seed_eval_photos[5:7])
    stack.store.put("datasets/alpha/not-yet-ingested.jpg", seed_eval_photos[7].read_bytes())
    assert stack.call(stack.search, "search_text", dataset="alpha", body={"query": "x"})[0] == 200  # warm cache

    status, deleted = stack.call(stack.datasets, "delete_dataset", dataset="alpha")

    assert status == 200
    # 6 images (one never ingested), 5 thumbnails, 2 segments
    assert deleted == {"dataset": "alpha", "images": 5, "segments": 2, "objects_deleted": 13}
    assert bucket_keys(stack, "datasets/alpha/") == set() and bucket_keys(stack, "indexes/alpha/") == set()
    assert bucket_keys(stack, "thumbnails/alpha/") == set()
    assert len(bucket_keys(stack, "datasets/beta/")) == 2 and len(bucket_keys(stack, "indexes/beta/")) == 1
    assert len(bucket_keys(stack, "thumbnails/beta/")) == 2
    assert stack.call(stack.datasets, "get_dataset", dataset="alpha")[0] == 404
    search_status, body = stack.call(stack.search, "search_text", dataset="alpha", body={"query": "x"})
    assert (search_status, body["error"]["code"]) == (404, "dataset_not_found")
    assert stack.call(stack.search, "search_text", dataset="beta", body={"query": "x"})[0] == 200


def test_a_delete_interrupted_after_the_objects_finishes_on_retry(
    stack: SearchStack, seed_eval_photos: list[Path]
) -> None:
    stack.index("alpha", seed_eval_photos[:3])
    # What a delete that timed out after removing the objects leaves: the catalog rows alone.
    stack.store.delete_many(sorted(
        bucket_keys(stack, "datasets/alpha/") | bucket_keys(stack, "indexes/alpha/") | bucket_keys(stack, "thumbnails/alpha/")
    ))

    status, deleted = stack.call(stack.datasets, "delete_dataset", dataset="alpha")

    assert status == 200 and deleted == {"dataset": "alpha", "images": 3, "segments": 1, "objects_deleted": 0}
    assert stack.call(stack.datasets, "get_dataset", dataset="alpha")[0] == 404
    assert stack.call(stack.datasets, "delete_dataset", dataset="alpha")[0] == 404


def test_delete_removes_the_objects_of_a_dataset_without_catalog_rows(
    stack: SearchStack, seed_eval_photos: list[Path]
) -> None:
    stack.index("alpha", seed_eval_photos[:2])
    stack.catalog.remove_dataset("alpha")  # images left behind, as the former delete order could leave them

    status, deleted = stack.call(stack.datasets, "delete_dataset", dataset="alpha")

    # 2 images, their 2 thumbnails, 1 segment
    assert status == 200 and deleted == {"dataset": "alpha", "images": 0, "segments": 0, "objects_deleted": 5}
    assert bucket_keys(stack, "datasets/alpha/") == set() and bucket_keys(stack, "indexes/alpha/") == set()
    assert bucket_keys(stack, "thumbnails/alpha/") == set()


def test_the_datasets_function_imports_neither_faiss_nor_onnxruntime() -> None:
    # Its cold start pays only for what listing and deleting need.
    handler = str(FUNCTIONS / "datasets" / "app.py")
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('datasets_app', {handler!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted({'faiss', 'onnxruntime', 'clipsearch.http.routes'} & set(sys.modules)))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert loaded.strip() == "['clipsearch.http.routes']"


@pytest.mark.parametrize("fixture", ["get_dataset", "delete_dataset"])
def test_unknown_and_invalid_datasets(stack: SearchStack, fixture: str) -> None:
    status, body = stack.call(stack.datasets, fixture, dataset="missing")
    assert (status, body["error"]["code"]) == (404, "dataset_not_found")
    status, body = stack.call(stack.datasets, fixture, dataset="-invalid")
    assert (status, body["error"]["code"]) == (400, "invalid_request")


def test_datasets_function_serves_its_openapi_document_and_404s_unknown_routes(stack: SearchStack) -> None:
    status, document = stack.call(stack.datasets, "get_openapi")
    assert status == 200
    assert set(document["paths"]) == {"/datasets", "/datasets/{dataset}"}
    assert set(document["paths"]["/datasets/{dataset}"]) == {"get", "delete"}
    status, body = stack.call(stack.datasets, "unknown_route")
    assert (status, body["error"]["code"]) == (404, "route_not_found")
