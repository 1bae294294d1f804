"""The search function driven with HTTP API v2 events against PostgreSQL, the S3 endpoint and the tiny model."""

from __future__ import annotations

import base64
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import pytest
from clipsearch import wiring
from http_events import load_function
from search_stack import MODEL_ID, SearchStack, clear_wiring, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration


@pytest.fixture
def photos(seed_eval_photos: list[Path]) -> list[Path]:
    return seed_eval_photos


def search_image(stack: SearchStack, dataset: str, photo: Path, **query) -> tuple[int, dict]:
    return stack.call(
        stack.search, "search_image_raw", dataset=dataset, body=photo.read_bytes(),
        query={key: str(value) for key, value in query.items()},
    )


def search_text(stack: SearchStack, dataset: str, body) -> tuple[int, dict]:
    return stack.call(stack.search, "search_text", dataset=dataset, body=body)


def keys(response: dict) -> list[str]:
    return [hit["key"] for hit in response["results"]]


def test_an_indexed_image_finds_itself_first_by_body_base64_and_key(stack: SearchStack, photos) -> None:
    stack.index("photos", photos[:10])
    query = photos[3]

    status, raw = search_image(stack, "photos", query, k=3)
    encoded = stack.call(
        stack.search, "search_image_json", dataset="photos",
        body={"image_base64": base64.b64encode(query.read_bytes()).decode(), "k": 3},
    )
    by_key = stack.call(
        stack.search, "search_image_json", dataset="photos", body={"key": f"datasets/photos/{query.name}", "k": 3}
    )

    assert status == 200
    first = raw["results"][0]
    assert first["rank"] == 1 and first["key"] == f"datasets/photos/{query.name}"
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert first["path"] == f"/home/user/photos/{query.name}"  # the source path recorded at ingest
    assert [hit["rank"] for hit in raw["results"]] == [1, 2, 3]
    assert raw["dataset"] == "photos" and raw["model"] == MODEL_ID and raw["k"] == 3 and raw["took_ms"] > 0
    for other in (encoded, by_key):
        assert other[0] == 200 and keys(other[1]) == keys(raw)


def test_text_search_ranks_by_cosine_and_reports_truncation(stack: SearchStack, photos) -> None:
    stack.index("photos", photos[:8], with_source_paths=False)

    status, short = search_text(stack, "photos", {"query": "a dog on a beach", "k": 5})
    _, long = search_text(stack, "photos", {"query": "dog " * 200})

    assert status == 200 and len(short["results"]) == 5 and short["truncated"] is False
    scores = [hit["score"] for hit in short["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= score <= 1.0 for score in scores)
    hit = short["results"][0]
    assert hit["path"] == f"s3://{stack.store.bucket}/{hit['key']}"  # no source path recorded
    assert long["truncated"] is True and len(long["results"]) == 5  # default k


def test_k_above_the_dataset_size_returns_fewer_results(stack: SearchStack, photos) -> None:
    stack.index("photos", photos[:4])
    status, body = search_text(stack, "photos", {"query": "anything", "k": 1000})
    assert status == 200 and body["k"] == 1000 and len(body["results"]) == 4


def test_presign_adds_a_url_to_each_result(stack: SearchStack, photos) -> None:
    stack.index("photos", photos[:3])
    status, body = stack.call(
        stack.search, "search_text", dataset="photos", body={"query": "x", "k": 2}, query={"presign": "true"}
    )
    assert status == 200
    assert all(hit["url"].startswith(stack.store._client.meta.endpoint_url) and "Signature" in hit["url"]
               for hit in body["results"])


def test_text_search_never_fetches_the_vision_tower(stack: SearchStack, photos) -> None:
    stack.index("photos", photos[:2])
    assert search_text(stack, "photos", {"query": "a cat"})[0] == 200
    cached = stack.model_cache_dir / MODEL_ID
    assert (cached / "text" / "model.onnx").is_file()
    assert not (cached / "vision").exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"query": ""}, "query"),
        ({"query": "   \n"}, "empty"),
        ({"query": "x", "k": 0}, "k"),
        ({"query": "x", "k": 1001}, "k"),
        ({"k": 3}, "query"),
        ({"query": "x", "colour": "red"}, "colour"),
        ('{"query": "unclosed', "JSON"),
    ],
)
def test_bad_text_requests_are_400(stack: SearchStack, photos, body, message: str) -> None:
    stack.index("photos", photos[:1])
    status, response = search_text(stack, "photos", body)
    assert status == 400
    assert response["error"]["code"] == "invalid_request" and message in response["error"]["message"]


def test_error_statuses(stack: SearchStack, photos, s3_client) -> None:
    stack.index("photos", photos[:2])
    stack.catalog.ensure_dataset("elsewhere", "another-model")
    stack.store.put("datasets/photos/notes.txt", b"not a photo")
    stack.store.put("datasets/photos/huge.jpg", b"\xff" * (6 * 1024 * 1024 + 1))

    def image_json(body: dict, dataset: str = "photos") -> tuple[int, dict]:
        return stack.call(stack.search, "search_image_json", dataset=dataset, body=body)

    cases = {
        "unknown dataset": (search_text(stack, "nope", {"query": "x"}), 404, "dataset_not_found"),
        "invalid dataset name": (search_text(stack, "-bad", {"query": "x"}), 400, "invalid_request"),
        "other model": (search_text(stack, "elsewhere", {"query": "x"}), 409, "model_mismatch"),
        "k in the query string": (search_image(stack, "photos", photos[0], k=0), 400, "invalid_request"),
        "k not a number": (search_image(stack, "photos", photos[0], k="many"), 400, "invalid_request"),
        "undecodable image": (
            stack.call(stack.search, "search_image_raw", dataset="photos", body=b"not an image at all"),
            400, "invalid_image",
        ),
        "empty image": (stack.call(stack.search, "search_image_raw", dataset="photos", body=b""), 400,
                        "invalid_request"),
        "image over the byte limit": (
            stack.call(stack.search, "search_image_raw", dataset="photos", body=b"\xff" * (6 * 1024 * 1024 + 1)),
            413, "image_too_large",
        ),
        "unsupported content type": (
            stack.call(stack.search, "search_image_raw", dataset="photos", body=b"x",
                       headers={"content-type": "application/pdf"}),
            415, "unsupported_media_type",
        ),
        "text route with a text body": (
            stack.call(stack.search, "search_text", dataset="photos", body="a cat",
                       headers={"content-type": "text/plain"}),
            415, "unsupported_media_type",
        ),
        "key outside datasets/": (image_json({"key": f"models/{MODEL_ID}/manifest.json"}), 400,
                                   "key_outside_dataset"),
        "key missing under datasets/": (image_json({"key": "datasets/photos/missing.jpg"}), 404, "object_not_found"),
        "key without an image suffix": (image_json({"key": "datasets/photos/notes.txt"}), 400, "invalid_key"),
        "key of an image over the byte limit": (image_json({"key": "datasets/photos/huge.jpg"}), 413,
                                               "image_too_large"),
        "both image and key": (image_json({"key": "datasets/photos/a.jpg", "image_base64": "AA=="}), 400,
                               "invalid_request"),
        "invalid base64": (image_json({"image_base64": "%%%"}), 400, "invalid_request"),
        "unknown route": (stack.call(stack.search, "unknown_route"), 404, "route_not_found"),
    }
    for name, ((status, body), expected_status, code) in cases.items():
        assert (status, body["error"]["code"]) == (expected_status, code), name
        assert body["error"]["message"], name
    assert cases["undecodable image"][0][1]["error"]["message"] == "request body: not a recognizable image format"


def test_an_unexpected_failure_is_a_generic_500(stack: SearchStack, photos, s3_client) -> None:
    stack.index("photos", photos[:1])
    # The model is gone from the bucket: a server fault, never reported as the caller's mistake.
    listed = s3_client.list_objects_v2(Bucket=stack.store.bucket, Prefix="models/")["Contents"]
    s3_client.delete_objects(Bucket=stack.store.bucket, Delete={"Objects": [{"Key": o["Key"]} for o in listed]})
    shutil.rmtree(wiring.get_settings().model_cache_dir)  # the model its init fetched into /tmp
    clear_wiring()
    cold = load_function("search")  # a new execution environment: its init cannot fetch the model either
    status, body = stack.call(cold, "search_text", dataset="photos", body={"query": "x"})
    assert status == 500 and body == {"error": {"code": "internal_error", "message": "internal error"}}


def test_search_leaves_the_process_faiss_threads_alone(stack: SearchStack, photos) -> None:
    # The local stack runs compaction in the same process: it must keep every core.
    threads = faiss.omp_get_max_threads()
    stack.index("photos", photos[:3])
    assert search_image(stack, "photos", photos[0], k=2)[0] == 200
    assert faiss.omp_get_max_threads() == threads


def test_a_new_batch_and_deletions_are_seen_by_a_warm_instance(stack: SearchStack, photos) -> None:
    stack.index("photos", photos[:6])
    assert search_image(stack, "photos", photos[0], k=3)[0] == 200  # warm: segments cached

    stack.index("photos", photos[6:10])
    _, after_batch = search_image(stack, "photos", photos[8], k=3)
    assert keys(after_batch)[0] == f"datasets/photos/{photos[8].name}"
    assert after_batch["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    removed = [photos[8], photos[2]]
    for photo in removed:
        stack.catalog.remove_images("photos", f"datasets/photos/{photo.name}", None)
    _, after_delete = search_image(stack, "photos", photos[8], k=8)
    assert len(after_delete["results"]) == 8  # 10 images, 2 deleted: still k live results
    assert not {f"datasets/photos/{photo.name}" for photo in removed} & set(keys(after_delete))


def test_two_datasets_are_isolated(stack: SearchStack, photos) -> None:
    stack.index("alpha", photos[:5])
    stack.index("beta", photos[20:25])

    _, in_beta = search_image(stack, "beta", photos[0], k=10)
    _, in_alpha = search_image(stack, "alpha", photos[0], k=10)

    assert len(in_beta["results"]) == 5 and all(key.startswith("datasets/beta/") for key in keys(in_beta))
    assert keys(in_alpha)[0] == f"datasets/alpha/{photos[0].name}"
    assert all(key.startswith("datasets/alpha/") for key in keys(in_alpha))


def test_concurrent_requests_on_one_warm_service(stack: SearchStack, photos) -> None:
    """The service the handler wires, called from 8 threads at once while still cold.

    Through the handler this cannot be asked: Powertools' resolver keeps the current event on a class
    attribute, and a Lambda environment never resolves two events at once."""
    from clipsearch.wiring import get_search_service

    stack.index("photos", photos[:6])
    stack.index("photos", photos[6:12])
    service = get_search_service()
    start = threading.Barrier(8)

    def client(worker: int) -> list[tuple[Path | None, list]]:
        start.wait()
        outcomes = []
        for round_ in range(4):
            photo = photos[(worker * 4 + round_) % 12]
            if (worker + round_) % 2:
                outcomes.append((photo, service.search_image("photos", photo.read_bytes(), photo.name, k=3).hits))
            else:
                outcomes.append((None, service.search_text("photos", f"photo {worker}", k=3).hits))
        return outcomes

    # Cold and concurrent at once: the model, the encoders and the segments are each loaded once.
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = [outcome for batch in pool.map(client, range(8)) for outcome in batch]

    assert len(outcomes) == 32
    for photo, hits in outcomes:
        assert len(hits) == 3
        if photo is not None:
            assert hits[0].key == f"datasets/photos/{photo.name}"


def test_openapi_document_is_generated_from_the_code(stack: SearchStack) -> None:
    status, document = stack.call(stack.search, "get_openapi")
    assert status == 200 and document["openapi"].startswith("3.")
    text_route = document["paths"]["/datasets/{dataset}/search/text"]["post"]
    assert "TextSearchRequest" in str(text_route["requestBody"])
    assert {"200", "400", "404", "409", "415"} <= set(text_route["responses"])
    image_body = document["paths"]["/datasets/{dataset}/search/image"]["post"]["requestBody"]["content"]
    assert {"image/*", "application/json"} <= set(image_body)
    assert "SearchResponse" in document["components"]["schemas"]
