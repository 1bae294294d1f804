"""Pagination, min_score, autocut, query arithmetic, filters and duplicates through the search function's HTTP handler."""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.datasets import image_key
from clipsearch.events import EventKind, ObjectEvent
from clipsearch.ingest import IngestService
from clipsearch.search import largest_gap_cut
from PIL import Image
from search_stack import MODEL_ID, SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration

DATASET = "photos"


def index_files(stack: SearchStack, files: dict[str, bytes]) -> None:
    """Uploads each file under datasets/photos/<relative path> and ingests them as one batch."""
    events = []
    for relative, data in files.items():
        key = image_key(DATASET, relative)
        etag = stack.store.put(key, data, content_type="image/jpeg")
        events.append(ObjectEvent(f"upload-{key}", EventKind.CREATED, stack.store.bucket, key, DATASET, etag))
    report = IngestService(stack.store, stack.catalog, stack.encoder, MODEL_ID, FaissVectorIndex()).ingest(events)
    assert not report.retry and not report.failed, report


def search_text(stack: SearchStack, body: dict) -> tuple[int, dict]:
    return stack.call(stack.search, "search_text", dataset=DATASET, body=body)


def ranking(response: dict) -> list[tuple[str, float]]:
    return [(hit["key"], hit["score"]) for hit in response["results"]]


def same_ranking(first: list[tuple[str, float]], second: list[tuple[str, float]]) -> bool:
    return [key for key, _ in first] == [key for key, _ in second] and [score for _, score in first] == (
        pytest.approx([score for _, score in second], abs=1e-5)
    )


def relative(key: str) -> str:
    return key.removeprefix(f"datasets/{DATASET}/")


def test_pages_cut_one_ranking_and_cuts_keep_its_order(stack: SearchStack, seed_eval_photos: list[Path]) -> None:
    photos = seed_eval_photos[:12]
    index_files(stack, {photo.name: photo.read_bytes() for photo in photos})
    query = {"query": "a red car"}

    _, whole = search_text(stack, {**query, "k": 12})
    pages = [search_text(stack, {**query, "k": 5, "offset": offset}) for offset in (0, 5, 10)]
    _, past_the_end = search_text(stack, {**query, "k": 5, "offset": 12})
    raw_status, raw_page = stack.call(
        stack.search, "search_image_raw", dataset=DATASET, body=photos[0].read_bytes(),
        query={"k": "4", "offset": "4"},
    )
    _, raw_whole = stack.call(
        stack.search, "search_image_raw", dataset=DATASET, body=photos[0].read_bytes(), query={"k": "8"}
    )

    assert [status for status, _ in pages] == [200, 200, 200]
    paged = [hit for _, page in pages for hit in ranking(page)]
    assert [key for key, _ in paged] == [key for key, _ in ranking(whole)]  # no overlap, no gap
    assert len({key for key, _ in paged}) == 12
    assert [hit["rank"] for _, page in pages for hit in page["results"]] == list(range(1, 13))
    assert [page["offset"] for _, page in pages] == [0, 5, 10] and len(pages[2][1]["results"]) == 2
    assert past_the_end["results"] == []
    assert raw_status == 200 and ranking(raw_page) == ranking(raw_whole)[4:8]

    scores = [score for _, score in ranking(whole)]
    threshold = scores[3]
    _, above = search_text(stack, {**query, "k": 12, "min_score": threshold})
    assert ranking(above) == [hit for hit in ranking(whole) if hit[1] >= threshold] and len(above["results"]) >= 4
    _, cut = search_text(stack, {**query, "k": 12, "autocut": True})
    assert cut["autocut_at"] == largest_gap_cut(scores) and ranking(cut) == ranking(whole)[: cut["autocut_at"]]


def test_weighted_terms_search_the_normalized_sum_of_their_embeddings(
    stack: SearchStack, seed_eval_photos: list[Path]
) -> None:
    photos = seed_eval_photos[:8]
    index_files(stack, {photo.name: photo.read_bytes() for photo in photos})
    vectors = {image_key(DATASET, photo.name): stack.encoder.embed_image(photo, photo.name).vector for photo in photos}
    liked, disliked = photos[1], photos[2]
    terms = [
        {"key": image_key(DATASET, liked.name), "weight": 1},
        {"image_base64": base64.b64encode(disliked.read_bytes()).decode(), "weight": -0.5},
    ]

    status, combined = search_text(stack, {"terms": terms, "k": 8})
    _, single_text = search_text(stack, {"query": "a beach", "k": 8})
    _, text_term = search_text(stack, {"terms": [{"text": "a beach", "weight": 2}], "k": 8})
    cancelled = search_text(stack, {"terms": [terms[0], {**terms[0], "weight": -1}]})

    assert status == 200, combined
    target = vectors[image_key(DATASET, liked.name)] - 0.5 * vectors[image_key(DATASET, disliked.name)]
    target /= np.linalg.norm(target)
    expected = sorted(((float(vector @ target), key) for key, vector in vectors.items()), reverse=True)
    assert [hit["key"] for hit in combined["results"]] == [key for _, key in expected]
    assert [hit["score"] for hit in combined["results"]] == pytest.approx([score for score, _ in expected], abs=1e-4)
    assert combined["results"][-1]["key"] == image_key(DATASET, disliked.name)
    assert same_ranking(ranking(text_term), ranking(single_text))
    assert cancelled[0] == 400 and cancelled[1]["error"]["code"] == "invalid_terms"


def test_filters_select_inside_faiss_so_a_page_stays_full(stack: SearchStack, seed_eval_photos: list[Path]) -> None:
    photos = seed_eval_photos[:12]
    index_files(stack, {f"home/{photo.name}": photo.read_bytes() for photo in photos[:8]})
    between = datetime.now(timezone.utc)
    index_files(stack, {f"trips/2024/{photo.name}": photo.read_bytes() for photo in photos[8:]})
    query = {"query": "mountains at dusk"}

    _, whole = search_text(stack, {**query, "k": 12})
    _, in_trips = search_text(stack, {**query, "k": 3, "prefix": "trips/"})
    _, in_home_page_2 = search_text(stack, {**query, "k": 3, "offset": 3, "prefix": "home/"})
    _, since = search_text(stack, {**query, "k": 12, "since": between.isoformat()})
    _, until = search_text(stack, {**query, "k": 12, "until": between.isoformat()})
    _, nothing = search_text(stack, {**query, "prefix": "nowhere/"})
    raw_status, raw_trips = stack.call(
        stack.search, "search_image_raw", dataset=DATASET, body=photos[0].read_bytes(),
        query={"k": "12", "prefix": "trips/2024/", "since": between.isoformat()},
    )

    trips_order = [hit for hit in ranking(whole) if relative(hit[0]).startswith("trips/")]
    home_order = [hit for hit in ranking(whole) if relative(hit[0]).startswith("home/")]
    assert same_ranking(ranking(in_trips), trips_order[:3])  # k hits, in the unfiltered order
    assert same_ranking(ranking(in_home_page_2), home_order[3:6])
    assert [key for key, _ in ranking(since)] == [key for key, _ in trips_order]
    assert [key for key, _ in ranking(until)] == [key for key, _ in home_order]
    assert nothing["results"] == []
    assert raw_status == 200 and len(raw_trips["results"]) == 4
    assert all(relative(hit["key"]).startswith("trips/2024/") for hit in raw_trips["results"])


BAD_TEXT_BODIES = [
    ("invalid_offset", {"query": "x", "offset": -1}),
    ("invalid_offset", {"query": "x", "offset": "5"}),
    ("invalid_min_score", {"query": "x", "min_score": 1.5}),
    ("invalid_autocut", {"query": "x", "autocut": "yes"}),
    ("invalid_prefix", {"query": "x", "prefix": "../other/"}),
    ("invalid_since", {"query": "x", "since": "yesterday"}),
    ("invalid_until", {"query": "x", "until": "2026-01-01T00:00:00"}),  # no time zone
    ("invalid_until", {"query": "x", "until": 5}),  # pydantic alone reads numbers as seconds since 1970
    ("invalid_since", {"query": "x", "since": "1700000000"}),
    ("invalid_until", {"query": "x", "since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}),
    ("invalid_terms", {"terms": [{"text": "x", "weight": 0}]}),
    ("invalid_terms", {"terms": []}),
    ("invalid_terms", {"terms": [{"text": "x", "key": "datasets/photos/a.jpg"}]}),
    ("invalid_terms", {"terms": [{"image_base64": "not base64!"}]}),
    ("invalid_terms", {"terms": [{"text": "x", "weight": -1}]}),
    ("key_outside_dataset", {"terms": [{"key": "datasets/other/a.jpg"}]}),
    ("invalid_request", {"query": "x", "terms": [{"text": "y"}]}),
]
BAD_IMAGE_QUERIES = [
    ("invalid_offset", {"offset": "+3"}),
    ("invalid_offset", {"offset": "10001"}),
    ("invalid_min_score", {"min_score": "nan"}),
    ("invalid_autocut", {"autocut": "maybe"}),
    ("invalid_since", {"since": "2026-13-01T00:00:00Z"}),
    ("invalid_until", {"until": "5"}),
]


def test_each_bad_parameter_is_a_400_naming_it(stack: SearchStack, seed_eval_photos: list[Path]) -> None:
    index_files(stack, {seed_eval_photos[0].name: seed_eval_photos[0].read_bytes()})
    answers = [(code, body, *search_text(stack, body)) for code, body in BAD_TEXT_BODIES]
    answers += [
        (code, query, *stack.call(stack.search, "search_image_raw", dataset=DATASET, body=b"\xff\xd8", query=query))
        for code, query in BAD_IMAGE_QUERIES
    ]
    wrong = [(code, given, status, answer) for code, given, status, answer in answers
             if status != 400 or answer["error"]["code"] != code]
    assert not wrong


def test_duplicates_groups_copies_and_near_copies(stack: SearchStack, seed_eval_photos: list[Path]) -> None:
    photos = seed_eval_photos[:6]
    original = photos[0].read_bytes()
    smaller = io.BytesIO()
    with Image.open(photos[0]) as image:
        image.convert("RGB").resize((image.width * 3 // 4, image.height * 3 // 4)).save(smaller, "JPEG", quality=85)
    files = {photo.name: photo.read_bytes() for photo in photos}
    files["backup/copy.jpg"] = original
    files["backup/smaller.jpg"] = smaller.getvalue()
    index_files(stack, files)

    status, found = stack.call(stack.search, "duplicates", dataset=DATASET, query={"min_score": "0.995"})
    bad_status, bad = stack.call(stack.search, "duplicates", dataset=DATASET, query={"min_score": "0.2"})
    missing_status, _ = stack.call(stack.search, "duplicates", dataset="nosuch")

    assert status == 200, found
    groups = [[relative(image["key"]) for image in group["images"]] for group in found["groups"]]
    assert {"backup/copy.jpg", "backup/smaller.jpg", photos[0].name} <= set(groups[0])
    assert all(len(group) >= 2 for group in groups) and len(set(sum(groups, []))) == len(sum(groups, []))
    assert all(image["score"] >= 0.995 for group in found["groups"] for image in group["images"])
    assert found["min_score"] == 0.995
    assert bad_status == 400 and bad["error"]["code"] == "invalid_min_score"
    assert missing_status == 404
