"""check_caller_image_key: which keys a caller may query by within a dataset, and the error each other key gets."""

from __future__ import annotations

import pytest
from clipsearch.datasets import MAX_KEY_BYTES, check_caller_image_key
from clipsearch.errors import InvalidDatasetName, InvalidKey, KeyOutsideDataset


@pytest.mark.parametrize(
    "key",
    ["datasets/A/x.jpg", "datasets/A/sub/dir/x.PNG", "datasets/A/.hidden.jpg", "datasets/A/a..b.jpg",
     "datasets/A/é ü.webp", "datasets/A/" + "n" * (MAX_KEY_BYTES - len("datasets/A/.jpg")) + ".jpg"],
)
def test_image_keys_of_the_dataset_pass(key: str) -> None:
    assert check_caller_image_key("A", key) == key


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("datasets/B/x.jpg", KeyOutsideDataset),
        ("datasets/AB/x.jpg", KeyOutsideDataset),
        ("datasets/a/x.jpg", KeyOutsideDataset),  # dataset names are case-sensitive, as S3 keys are
        ("indexes/A/segments/s.faiss", KeyOutsideDataset),
        ("datasets/A/../../private/x.jpg", InvalidKey),
        ("datasets/A/./x.jpg", InvalidKey),
        ("datasets/A/a\x00b.jpg", InvalidKey),
        ("datasets/A/a\x7fb.jpg", InvalidKey),
        ("datasets/A//x.jpg", InvalidKey),
        ("datasets/A\\x.jpg", InvalidKey),
        ("datasets/A/" + "n" * (MAX_KEY_BYTES - len("datasets/A/.jpg") + 1) + ".jpg", InvalidKey),
        ("datasets/A/\ud800.jpg", InvalidKey),
        ("datasets/A/x.txt", InvalidKey),
        ("datasets/A/x", InvalidKey),
        ("", InvalidKey),
    ],
)
def test_other_keys_are_refused_without_echoing_the_key(key: str, error: type[Exception]) -> None:
    with pytest.raises(error) as raised:
        check_caller_image_key("A", key)
    assert key not in str(raised.value) or not key


def test_the_dataset_name_is_checked_too() -> None:
    with pytest.raises(InvalidDatasetName):
        check_caller_image_key("../A", "datasets/../A/x.jpg")
