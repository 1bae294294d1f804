"""map_file_key: the key a local file gets (the same for S3 and the local store), and the names it refuses."""

from __future__ import annotations

import unicodedata

import pytest
from clipsearch.datasets import (
    MAX_KEY_BYTES,
    MAX_KEY_SEGMENT_BYTES,
    SOURCE_PATH_METADATA,
    check_caller_image_key,
    decode_source_path,
    encode_source_path,
    image_key,
    storable_everywhere,
)
from clipsearch.errors import InvalidRequest
from clipsearch_tools.object_keys import MAX_METADATA_BYTES, MappedKey, RefusedName, map_file_key
from clipsearch.thumbnails import thumbnail_key

CAFE_NFC = unicodedata.normalize("NFC", "café.jpg")
CAFE_NFD = unicodedata.normalize("NFD", "café.jpg")


def key_of(relative: str, dataset: str = "A") -> str:
    mapped = map_file_key(dataset, relative, "/photos/" + relative)
    assert isinstance(mapped, MappedKey), mapped
    return mapped.key


@pytest.mark.parametrize(
    ("relative", "key"),
    [
        ("x.jpg", "datasets/A/x.jpg"),
        ("sub/dir/x.PNG", "datasets/A/sub/dir/x.PNG"),
        ("a b/trail .jpg", "datasets/A/a b/trail .jpg"),
        ("100%+q?#;&.jpg", "datasets/A/100%+q?#;&.jpg"),
        ("dir./..x.jpg", "datasets/A/dir./..x.jpg"),
        (CAFE_NFC, "datasets/A/" + CAFE_NFC),
        (CAFE_NFD, "datasets/A/" + CAFE_NFC),  # NFC: the same key whichever form the file system keeps
        ("y" * (MAX_KEY_SEGMENT_BYTES - 4) + ".jpg", "datasets/A/" + "y" * (MAX_KEY_SEGMENT_BYTES - 4) + ".jpg"),
    ],
)
def test_a_storable_path_keeps_its_name_under_the_dataset_and_is_a_valid_query_key(relative: str, key: str) -> None:
    assert key_of(relative) == key
    assert check_caller_image_key("A", key) == key


def test_the_longest_key_s3_takes_is_kept() -> None:
    relative = "d/" * ((MAX_KEY_BYTES - len("datasets/A/x.jpg")) // 2) + "x.jpg"
    relative = "e" * (MAX_KEY_BYTES - len("datasets/A/") - len(relative)) + relative
    assert len(key_of(relative).encode()) == MAX_KEY_BYTES


@pytest.mark.parametrize(
    ("relative", "reason"),
    [
        ("a\\b.jpg", "backslash"),          # the local store would store it as a/b.jpg
        ("a/\\\\b.jpg", "backslash"),
        ("a//b.jpg", "empty, '.' or '..'"),  # the local store would store it as a/b.jpg
        ("./a.jpg", "empty, '.' or '..'"),
        ("a/../b.jpg", "empty, '.' or '..'"),
        ("/abs.jpg", "empty, '.' or '..'"),
        ("line\nbreak.jpg", "control character"),
        ("del\x7f.jpg", "control character"),
        ("bad\udcff.jpg", "not valid UTF-8"),  # os.fsdecode of a name that is not UTF-8
        ("z" * (MAX_KEY_SEGMENT_BYTES - 3) + ".jpg", f"over the {MAX_KEY_SEGMENT_BYTES}"),
    ],
)
def test_a_name_the_stores_disagree_on_is_refused_with_its_reason(relative: str, reason: str) -> None:
    refused = map_file_key("A", relative, "/photos/" + relative)
    assert isinstance(refused, RefusedName)
    assert reason in refused.reason


def test_a_segment_measured_in_utf8_bytes_not_characters() -> None:
    assert key_of("é" * 125 + ".jpg").endswith(".jpg")  # 254 bytes
    refused = map_file_key("A", "é" * 126 + ".jpg", "/p")  # 256 bytes, 130 characters
    assert isinstance(refused, RefusedName) and "256 bytes" in refused.reason


def test_a_key_over_1024_bytes_is_refused_not_truncated() -> None:
    relative = "d/" * 504 + "xx.jpg"
    assert len(("datasets/A/" + relative).encode()) == MAX_KEY_BYTES + 1
    refused = map_file_key("A", relative, "/photos/" + relative)
    assert isinstance(refused, RefusedName)
    assert f"{MAX_KEY_BYTES + 1} bytes, over S3's limit of {MAX_KEY_BYTES}" in refused.reason


def test_the_source_path_travels_encoded_and_comes_back_as_the_real_path() -> None:
    real = "/home/zoé/100% sure/" + CAFE_NFD
    mapped = map_file_key("A", CAFE_NFD, real)
    assert isinstance(mapped, MappedKey)
    assert mapped.source_path_metadata.isascii()
    assert decode_source_path(mapped.source_path_metadata) == real  # not normalized: the file's own name
    assert decode_source_path(encode_source_path("/p/%41.jpg")) == "/p/%41.jpg"


def test_a_source_path_over_s3s_metadata_limit_is_left_out_not_cut() -> None:
    fits = "/" + "a" * (MAX_METADATA_BYTES - len(SOURCE_PATH_METADATA) - 1)
    assert map_file_key("A", "x.jpg", fits).source_path_metadata == fits
    assert map_file_key("A", "x.jpg", fits + "a").source_path_metadata is None
    assert map_file_key("A", "x.jpg", "/" + "é" * 400).source_path_metadata is None  # 2,400 bytes encoded


def test_image_key_refuses_a_backslash_rather_than_reading_it_as_a_separator() -> None:
    assert image_key("A", "sub/x.jpg") == "datasets/A/sub/x.jpg"
    with pytest.raises(InvalidRequest):
        image_key("A", "sub\\x.jpg")


def test_a_thumbnail_key_seven_bytes_longer_than_its_image_key_may_not_be_storable() -> None:
    longest_part = "datasets/A/" + "n" * (MAX_KEY_SEGMENT_BYTES - 4) + ".jpg"
    longest_key = "datasets/A/" + ("d" * 200 + "/") * 5 + "x" * (MAX_KEY_BYTES - 1020) + ".jpg"
    assert len(longest_key.encode()) == MAX_KEY_BYTES
    for image in (longest_part, longest_key):
        assert storable_everywhere(image)
        assert not storable_everywhere(thumbnail_key(image))
    assert storable_everywhere(thumbnail_key("datasets/A/sub/x.jpg"))
