"""Which object key a local file gets under `datasets/<name>/`, the same for AWS S3 and the local stack's SeaweedFS.

S3 stores any UTF-8 key up to 1,024 bytes as is. SeaweedFS does not: it rewrites `\\` and `//` to `/`,
refuses `.` and `..` segments and segments over 255 bytes, and accepts keys over 1,024 bytes. A file
whose name one of them would store differently, or not at all, is refused here for both targets, so
a file never lands under another key than the one it would get in AWS. The rule:

- the key is `datasets/<dataset>/` + the file's path relative to the ingested folder, `/`-separated;
- the path is NFC-normalized, so the same folder copied between macOS (NFD names) and Linux keeps
  its keys; two files whose paths differ only in normalization would share a key: the second is
  refused;
- refused: names that are not valid UTF-8, control characters, backslashes, empty, `.` or `..`
  segments, a segment over 255 UTF-8 bytes, a key over 1,024 UTF-8 bytes (S3's limit).

Every key this accepts is also one the search API accepts as a query key. The file's real path
(not normalized) travels beside the key as the `source-path` metadata, which search results show.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from clipsearch.datasets import (
    MAX_KEY_BYTES,
    MAX_KEY_SEGMENT_BYTES,
    SOURCE_PATH_METADATA,
    dataset_prefix,
    encode_source_path,
)

# S3 allows 2 KB of user metadata, counting the UTF-8 bytes of each name and value.
MAX_METADATA_BYTES = 2048


@dataclass(frozen=True)
class MappedKey:
    """Where a file goes: its key, and its source path as metadata (None when too long to travel)."""

    key: str
    source_path_metadata: str | None


@dataclass(frozen=True)
class RefusedName:
    """A file no key is given to, and why (said to the user as is)."""

    reason: str


def map_file_key(dataset: str, relative_path: str, source_path: str) -> MappedKey | RefusedName:
    """The key of the file at `relative_path` (POSIX, relative to the ingested folder) in `dataset`.

    `source_path` is the file's full path as the user knows it; it travels only when its encoded form fits
    S3's metadata limit.
    """
    try:
        relative_path.encode("utf-8")
    except UnicodeEncodeError:
        return RefusedName("its name is not valid UTF-8 (rename the file)")
    if any(ord(character) < 0x20 or ord(character) == 0x7F for character in relative_path):
        return RefusedName("its name contains a control character (rename the file)")
    if "\\" in relative_path:
        return RefusedName("its name contains a backslash, which the local object store reads as '/' "
                           "(rename the file)")
    normalized = unicodedata.normalize("NFC", relative_path)
    segments = normalized.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return RefusedName("its path has an empty, '.' or '..' part")
    longest = max(len(segment.encode("utf-8")) for segment in segments)
    if longest > MAX_KEY_SEGMENT_BYTES:
        return RefusedName(f"a part of its path is {longest} bytes, over the {MAX_KEY_SEGMENT_BYTES} the local "
                           "object store holds (rename it)")
    key = dataset_prefix(dataset) + normalized
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        return RefusedName(f"its key would be {size} bytes, over S3's limit of {MAX_KEY_BYTES} "
                           "(shorten its path)")
    metadata = encode_source_path(source_path)
    fits = len(SOURCE_PATH_METADATA) + len(metadata) <= MAX_METADATA_BYTES
    return MappedKey(key, metadata if fits else None)
