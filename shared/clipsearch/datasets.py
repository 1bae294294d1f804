"""Dataset names and the bucket's key layout: the one place that knows where things live."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import quote, unquote

from clipsearch.errors import InvalidDatasetName, InvalidKey, InvalidRequest, KeyOutsideDataset

DATASET_NAME_RULE = "1-63 characters from A-Z a-z 0-9 _ -, starting with a letter or digit"
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")

DATASETS_PREFIX = "datasets/"
INDEXES_PREFIX = "indexes/"
THUMBNAILS_PREFIX = "thumbnails/"
MODELS_PREFIX = "models/"
MAX_KEY_BYTES = 1024  # S3's limit on a key, in UTF-8 bytes
MAX_KEY_SEGMENT_BYTES = 255  # the local store (SeaweedFS) refuses a longer part between '/'; S3 has no such limit
# An image's path as its owner knows it travels with the object as this metadata, percent-encoded (S3
# metadata is ASCII); search results show it decoded.
SOURCE_PATH_METADATA = "source-path"
_SOURCE_PATH_SAFE = "/ !#$&'()*+,:;=?@[]~-._"
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)


def validate_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        raise InvalidDatasetName(f"invalid dataset name {name!r}: use {DATASET_NAME_RULE}")
    return name


def is_valid_dataset_name(name: str) -> bool:
    return isinstance(name, str) and _DATASET_NAME.fullmatch(name) is not None


def dataset_prefix(dataset: str) -> str:
    return f"{DATASETS_PREFIX}{validate_dataset_name(dataset)}/"


def thumbnails_prefix(dataset: str) -> str:
    return f"{THUMBNAILS_PREFIX}{validate_dataset_name(dataset)}/"


def thumbnail_key(image_key: str) -> str:
    """datasets/<dataset>/<path> -> thumbnails/<dataset>/<path>.webp: one thumbnail per image key, so the
    removal of a key removes its thumbnail without reading the catalog."""
    return THUMBNAILS_PREFIX + image_key.removeprefix(DATASETS_PREFIX) + ".webp"


def image_key(dataset: str, relative_path: str) -> str:
    """The key of a `/`-separated relative path (the CLI maps local files with clipsearch_tools.object_keys)."""
    relative = PurePosixPath(relative_path)
    if "\\" in relative_path or relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise InvalidRequest(f"invalid image path {relative_path!r}: must be relative, without '..' or '\\'")
    return dataset_prefix(dataset) + relative.as_posix()


def encode_source_path(path: str) -> str:
    """`path` as S3 metadata: ASCII, `%` and everything outside a few printable characters percent-encoded
    (bytes of a name that is not UTF-8 as they are on disk)."""
    return quote(path, safe=_SOURCE_PATH_SAFE, errors="surrogateescape")


def decode_source_path(metadata: str) -> str:
    """The path `encode_source_path` encoded (bytes that are not UTF-8 shown as U+FFFD)."""
    return unquote(metadata, errors="replace")


def storable_everywhere(key: str) -> bool:
    """Whether S3 and the local store both hold `key` as is, by length (at most 1,024 UTF-8 bytes, no part
    over 255)."""
    encoded = key.encode("utf-8", "surrogatepass")
    return len(encoded) <= MAX_KEY_BYTES and all(len(part) <= MAX_KEY_SEGMENT_BYTES for part in encoded.split(b"/"))


def segment_key(dataset: str, segment_id: str) -> str:
    return f"{INDEXES_PREFIX}{validate_dataset_name(dataset)}/segments/{segment_id}.faiss"


def model_prefix(model_id: str) -> str:
    return f"{MODELS_PREFIX}{model_id}/"


def has_image_suffix(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageKey:
    """A key under `datasets/<dataset>/`, split into its dataset and its path inside the dataset."""

    dataset: str
    relative_path: str

    @property
    def key(self) -> str:
        return f"{DATASETS_PREFIX}{self.dataset}/{self.relative_path}"


def parse_image_key(key: str) -> ImageKey | None:
    """The dataset and relative path of `key`, or None when the key is not a dataset image."""
    if not key.startswith(DATASETS_PREFIX):
        return None
    dataset, _, relative_path = key[len(DATASETS_PREFIX):].partition("/")
    if not is_valid_dataset_name(dataset) or not relative_path or relative_path.endswith("/"):
        return None
    return ImageKey(dataset, relative_path)


def check_caller_image_key(dataset: str, key: str) -> str:
    """`key` when a caller may query by it within `dataset`: an image key under datasets/<dataset>/ that every
    object store reads as the same object. Raises InvalidKey or KeyOutsideDataset, never naming the key (a
    malformed key is not worth echoing, and the answer must not depend on what another dataset holds)."""
    prefix = dataset_prefix(dataset)
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("the key is not valid Unicode text") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"the key is {size} bytes, over the limit of {MAX_KEY_BYTES}")
    if any(ord(character) < 0x20 or ord(character) == 0x7F for character in key):
        raise InvalidKey("the key contains control characters")
    if "\\" in key:
        raise InvalidKey("the key contains a backslash (object stores disagree on what it means)")
    segments = key.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise InvalidKey("the key has an empty, '.' or '..' segment")
    if not key.startswith(prefix):
        raise KeyOutsideDataset(f"the key must be under {prefix}, the dataset this request searches")
    if not has_image_suffix(key):
        raise InvalidKey(f"the key must name an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return key
