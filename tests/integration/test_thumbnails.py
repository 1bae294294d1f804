"""Thumbnails: written at ingest (upright, WebP, 320 px), served by presigned URL with hits, removed with their image."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import pytest
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.datasets import image_key
from clipsearch.events import EventKind, ObjectEvent
from clipsearch.ingest import IngestService
from clipsearch.thumbnails import thumbnail_key
from PIL import Image
from search_stack import MODEL_ID, SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)
from test_search_refinements import DATASET, index_files

pytestmark = pytest.mark.integration

EXIF_ORIENTATION = 0x0112
ROTATED_90_CLOCKWISE = 6  # the camera was turned: display the stored pixels rotated a quarter turn


def sideways_jpeg() -> bytes:
    """640x480 stored pixels, red on the left half, tagged to be shown rotated (upright: 480x640, red on top)."""
    image = Image.new("RGB", (640, 480), "blue")
    image.paste((255, 0, 0), (0, 0, 320, 480))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CLOCKWISE
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def test_ingest_writes_upright_thumbnails_search_links_them_and_removal_deletes_them(
    stack: SearchStack, seed_eval_photos: list[Path]
) -> None:
    photo = seed_eval_photos[0]
    index_files(stack, {"phone/sideways.jpg": sideways_jpeg(), photo.name: photo.read_bytes()})

    with Image.open(io.BytesIO(stack.store.get(thumbnail_key(image_key(DATASET, "phone/sideways.jpg"))).data)) as thumb:
        assert thumb.format == "WEBP" and thumb.size == (240, 320)  # upright, longest side 320
        top, bottom = thumb.convert("RGB").getpixel((120, 20)), thumb.convert("RGB").getpixel((120, 300))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left (red) half is on top once upright
    with Image.open(photo) as original, Image.open(
        io.BytesIO(stack.store.get(thumbnail_key(image_key(DATASET, photo.name))).data)
    ) as thumb:
        assert max(thumb.size) == min(320, max(original.size))

    status, found = stack.call(
        stack.search, "search_text", dataset=DATASET, body={"query": "anything", "k": 2}, query={"thumbnails": "true"}
    )
    _, plain = stack.call(stack.search, "search_text", dataset=DATASET, body={"query": "anything", "k": 2})
    assert status == 200 and all(hit["thumbnail"] for hit in found["results"])
    assert all(hit["thumbnail"] is None for hit in plain["results"])
    for hit in found["results"]:
        assert "X-Amz-Signature" in hit["thumbnail"] and "X-Amz-Expires=900" in hit["thumbnail"]
        with urllib.request.urlopen(hit["thumbnail"], timeout=10) as response:
            assert response.read() == stack.store.get(thumbnail_key(hit["key"])).data

    removed_key = image_key(DATASET, photo.name)
    stack.store.delete_many([removed_key])
    report = IngestService(stack.store, stack.catalog, stack.encoder, MODEL_ID, FaissVectorIndex()).ingest(
        [ObjectEvent("removal", EventKind.REMOVED, stack.store.bucket, removed_key, DATASET, None)]
    )
    assert report.removed == 1
    assert stack.store.head(thumbnail_key(removed_key)) is None
    assert stack.store.head(thumbnail_key(image_key(DATASET, "phone/sideways.jpg"))) is not None
