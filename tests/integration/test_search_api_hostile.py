"""Hostile input to the search function: each case its expected 4xx and error code, refused before any storage call."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from clipsearch import wiring
from clipsearch.adapters.s3_store import S3ObjectStore
from clipsearch.events import EventKind, ObjectEvent
from clipsearch_tools.local.ports import free_port
from PIL import Image
from search_stack import MODEL_ID, SearchStack, clear_wiring, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration

DATASET = "photos"
OTHER = "other"


@pytest.fixture
def indexed(stack: SearchStack, seed_eval_photos: list[Path]) -> SearchStack:
    """`photos` and `other` each hold indexed images; `other` also holds other/secret.jpg."""
    stack.index(DATASET, seed_eval_photos[:2])
    stack.index(OTHER, seed_eval_photos[2:4])
    stack.store.put(f"datasets/{OTHER}/secret.jpg", seed_eval_photos[4].read_bytes())
    return stack


@pytest.fixture
def storage_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The object-store reads made from now on (head and get, by key)."""
    calls: list[str] = []
    for name in ("head", "get"):
        original = getattr(S3ObjectStore, name)

        def recording(self, key, *args, _original=original, **kwargs):
            calls.append(key)
            return _original(self, key, *args, **kwargs)

        monkeypatch.setattr(S3ObjectStore, name, recording)
    return calls


def by_key(stack: SearchStack, key: str) -> tuple[int, dict]:
    return stack.call(stack.search, "search_image_json", dataset=DATASET, body={"key": key})


LONG_NAME = "a" * (1024 - len(f"datasets/{DATASET}/.jpg") + 1)
KEY_CASES = {
    "another dataset's existing image": (f"datasets/{OTHER}/secret.jpg", "key_outside_dataset"),
    "another dataset's missing image": (f"datasets/{OTHER}/missing.jpg", "key_outside_dataset"),
    "a dataset whose name extends this one": (f"datasets/{DATASET}-x/a.jpg", "key_outside_dataset"),
    "the dataset name as a file": (f"datasets/{DATASET}.jpg", "key_outside_dataset"),
    "outside datasets/": (f"models/{MODEL_ID}/manifest.json", "key_outside_dataset"),
    "traversal to a private prefix": (f"datasets/{DATASET}/../../private/x.jpg", "invalid_key"),
    "traversal into another dataset": (f"datasets/{DATASET}/../{OTHER}/secret.jpg", "invalid_key"),
    "a '.' segment": (f"datasets/{DATASET}/./x.jpg", "invalid_key"),
    "a NUL byte": (f"datasets/{DATASET}/a\x00b.jpg", "invalid_key"),
    "a newline": (f"datasets/{DATASET}/a\nb.jpg", "invalid_key"),
    "an empty segment": (f"datasets/{DATASET}//x.jpg", "invalid_key"),
    "a trailing slash": (f"datasets/{DATASET}/x.jpg/", "invalid_key"),
    "a leading slash": (f"/datasets/{DATASET}/x.jpg", "invalid_key"),
    "a backslash": (f"datasets/{DATASET}\\..\\{OTHER}\\secret.jpg", "invalid_key"),
    "1025 bytes": (f"datasets/{DATASET}/{LONG_NAME}.jpg", "invalid_key"),
    "over 1024 bytes in UTF-8, under in characters": (f"datasets/{DATASET}/{'é' * 600}.jpg", "invalid_key"),
    "empty": ("", "invalid_key"),
    "not an image": (f"datasets/{DATASET}/notes.txt", "invalid_key"),
}


@pytest.mark.parametrize(("key", "code"), KEY_CASES.values(), ids=KEY_CASES.keys())
def test_a_bad_key_is_400_before_any_storage_call(indexed: SearchStack, storage_calls, key: str, code: str) -> None:
    assert len(f"datasets/{DATASET}/{LONG_NAME}.jpg".encode()) == 1025

    status, body = by_key(indexed, key)

    assert (status, body["error"]["code"]) == (400, code)
    assert key not in body["error"]["message"] or not key
    assert storage_calls == []


def test_the_answer_for_another_dataset_does_not_reveal_what_it_holds(indexed: SearchStack) -> None:
    existing = by_key(indexed, f"datasets/{OTHER}/secret.jpg")
    missing = by_key(indexed, f"datasets/{OTHER}/missing.jpg")
    oversized = by_key(indexed, f"datasets/{OTHER}/{'b' * 900}.jpg")
    assert existing == missing == oversized


def test_a_lone_surrogate_in_the_key_is_400(indexed: SearchStack, storage_calls) -> None:
    body = '{"key": "datasets/%s/\\ud800.jpg"}' % DATASET  # valid JSON, but no Unicode text: pydantic refuses it
    status, answer = indexed.call(indexed.search, "search_image_json", dataset=DATASET, body=body)
    assert (status, answer["error"]["code"]) == (400, "invalid_request") and storage_calls == []


def test_a_good_key_of_this_dataset_still_searches(indexed: SearchStack, seed_eval_photos) -> None:
    status, body = by_key(indexed, f"datasets/{DATASET}/{seed_eval_photos[0].name}")
    assert status == 200 and body["results"][0]["key"] == f"datasets/{DATASET}/{seed_eval_photos[0].name}"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


DEEP_CASES = {
    "array depth 999": ("search_text", nested(999)),
    "array depth 1000": ("search_text", nested(1000)),
    "array depth 100000": ("search_text", nested(100_000)),
    "object depth 1000": ("search_text", '{"a":' * 1000 + "1" + "}" * 1000),
    "query nested 999 deep": ("search_text", '{"query": ' + nested(999) + "}"),
    "query nested 500 deep": ("search_text", '{"query": ' + nested(500) + "}"),
    "image route depth 1000": ("search_image_json", nested(1000)),
    "image route key nested 100000 deep": ("search_image_json", '{"key": ' + nested(100_000) + "}"),
}


@pytest.mark.parametrize(("fixture", "body"), DEEP_CASES.values(), ids=DEEP_CASES.keys())
def test_deeply_nested_json_is_400(indexed: SearchStack, fixture: str, body: str) -> None:
    status, answer = indexed.call(indexed.search, fixture, dataset=DATASET, body=body)
    assert (status, answer["error"]["code"]) == (400, "invalid_request")
    assert answer["error"]["message"]


LOOSE_K = {
    "text k as a string": ("search_text", {"query": "a dog", "k": "5"}),
    "text k as a float": ("search_text", {"query": "a dog", "k": 3.0}),
    "text k as true": ("search_text", {"query": "a dog", "k": True}),
    "text k as null": ("search_text", {"query": "a dog", "k": None}),
    "image k as a string": ("search_image_json", {"key": f"datasets/{DATASET}/x.jpg", "k": "5"}),
    "image k as a float": ("search_image_json", {"key": f"datasets/{DATASET}/x.jpg", "k": 3.0}),
    "image k as true": ("search_image_json", {"key": f"datasets/{DATASET}/x.jpg", "k": True}),
}


@pytest.mark.parametrize(("fixture", "body"), LOOSE_K.values(), ids=LOOSE_K.keys())
def test_k_must_be_a_json_integer(indexed: SearchStack, storage_calls, fixture: str, body: dict) -> None:
    status, answer = indexed.call(indexed.search, fixture, dataset=DATASET, body=body)
    assert (status, answer["error"]["code"]) == (400, "invalid_request")
    assert "k" in answer["error"]["message"] and storage_calls == []


@pytest.mark.parametrize("k", ["5.0", "+5", " 5", "5 ", "5_0", "\u0665", "5,6", "0x5", "", "-1"])
def test_query_string_k_must_be_decimal_digits(indexed: SearchStack, storage_calls, k: str) -> None:
    status, answer = indexed.call(
        indexed.search, "search_image_raw", dataset=DATASET, body=b"\xff\xd8 not read", query={"k": k}
    )
    assert (status, answer["error"]["code"]) == (400, "invalid_request")
    assert "k" in answer["error"]["message"] and storage_calls == []


def test_integer_k_in_either_form_is_accepted(indexed: SearchStack, seed_eval_photos) -> None:
    text = indexed.call(indexed.search, "search_text", dataset=DATASET, body={"query": "a dog", "k": 1})
    image = indexed.call(
        indexed.search, "search_image_raw", dataset=DATASET, body=seed_eval_photos[0].read_bytes(), query={"k": "01"}
    )
    assert (text[0], text[1]["k"]) == (200, 1) and (image[0], image[1]["k"]) == (200, 1)


def closed_port() -> int:
    return free_port()  # below the ephemeral range: no listener of this process can be given it meanwhile


def test_503_names_no_host_and_logs_the_details(
    indexed: SearchStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = closed_port()  # nothing listens: PostgreSQL refuses the connection
    monkeypatch.setenv("CLIPSEARCH_DATABASE_URL", f"postgresql://nobody@127.0.0.1:{port}/nothing")
    clear_wiring()  # the function wires its service from the environment on its next request

    logged: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = logged.append
    errors_logger = logging.getLogger("clipsearch.http.errors")
    errors_logger.addHandler(listener)
    try:
        status, body = indexed.call(indexed.search, "search_text", dataset=DATASET, body={"query": "a dog"})
    finally:
        errors_logger.removeHandler(listener)

    assert status == 503
    assert body == {"error": {"code": "unavailable", "message": "a service behind this API is unavailable; "
                                                                 "retry shortly"}}
    [detail] = logged
    assert detail.levelno == logging.WARNING
    assert f'"127.0.0.1", port {port}' in detail.getMessage() and "PostgreSQL" in detail.getMessage()


def test_openapi_documents_503_and_the_key_rules(stack: SearchStack) -> None:
    status, document = stack.call(stack.search, "get_openapi")
    image_route = document["paths"]["/datasets/{dataset}/search/image"]["post"]
    text_route = document["paths"]["/datasets/{dataset}/search/text"]["post"]
    assert status == 200 and "503" in image_route["responses"] and "503" in text_route["responses"]
    assert "key_outside_dataset" in image_route["description"] and "invalid_key" in image_route["description"]
    k_schema = json.dumps(document["components"]["schemas"]["TextSearchRequest"]["properties"]["k"])
    assert '"integer"' in k_schema


def blank_png(width: int, height: int) -> bytes:
    """A one-bit PNG: a few kilobytes however many pixels it declares."""
    encoded = io.BytesIO()
    Image.new("1", (width, height)).save(encoded, format="PNG")
    return encoded.getvalue()


def test_a_query_image_over_the_query_pixel_cap_is_413_naming_the_cap(indexed: SearchStack) -> None:
    over_query_cap = blank_png(6000, 4001)  # 24,006,000 pixels: over the search cap, under ingest's 80 MP
    assert len(over_query_cap) < 1024 * 1024

    status, answer = indexed.call(indexed.search, "search_image_raw", dataset=DATASET, body=over_query_cap)

    assert (status, answer["error"]["code"]) == (413, "image_too_large")
    assert "6000x4001" in answer["error"]["message"] and "24000000 pixels" in answer["error"]["message"]


def test_the_query_pixel_cap_is_a_setting_and_ingest_keeps_its_own(
    indexed: SearchStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPSEARCH_MAX_QUERY_IMAGE_PIXELS", "1000000")
    clear_wiring()  # the functions wire their services from the environment on their next request
    key = f"datasets/{DATASET}/wide.png"
    etag = indexed.store.put(key, blank_png(1001, 1000), content_type="image/png")

    at_cap = indexed.call(indexed.search, "search_image_raw", dataset=DATASET, body=blank_png(1000, 1000))
    uploaded = indexed.call(indexed.search, "search_image_raw", dataset=DATASET, body=blank_png(1001, 1000))
    stored = by_key(indexed, key)
    ingested = wiring.get_ingest_service().ingest(
        [ObjectEvent("upload-wide", EventKind.CREATED, indexed.store.bucket, key, DATASET, etag)]
    )

    assert at_cap[0] == 200
    assert (uploaded[0], uploaded[1]["error"]["code"]) == (413, "image_too_large")
    assert "1000000 pixels" in uploaded[1]["error"]["message"]
    assert (stored[0], stored[1]["error"]["code"]) == (413, "image_too_large")
    assert (ingested.indexed, ingested.failed, ingested.retry) == (1, 0, {})  # ingest's cap is still 80 MP
    assert indexed.catalog.live_images(DATASET)[key].status == "indexed"
