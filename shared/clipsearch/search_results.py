"""What a search asks and returns, and their limits: light types the HTTP layer imports without faiss or onnxruntime."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from clipsearch.errors import InvalidRequest

MAX_K = 1000
DEFAULT_K = 5
# Each page searches offset + k vectors per segment: this keeps the deepest page a few ms on a flat index.
MAX_OFFSET = 10_000
MAX_TERMS = 10
MAX_TERM_WEIGHT = 10.0
MAX_PREFIX_CHARS = 1024
# A sum of terms this close to zero points nowhere (e.g. "beach" minus "beach").
MIN_COMBINED_NORM = 1e-6
DEFAULT_DUPLICATE_SCORE = 0.95
MIN_DUPLICATE_SCORE = 0.5


class InvalidParameter(InvalidRequest):
    """A request parameter with a bad value (HTTP 400 with the code invalid_<parameter>)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


@dataclass(frozen=True)
class ImageFilter:
    """Which images a search may return: keys under datasets/<dataset>/<key_prefix>, ingested in [since, until)."""

    key_prefix: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def active(self) -> bool:
        return bool(self.key_prefix) or self.since is not None or self.until is not None


@dataclass(frozen=True)
class SearchOptions:
    """How to cut and page the ranking: skip `offset` hits, drop those under `min_score`, and with `autocut`
    stop at the largest drop between consecutive scores among the first offset + k."""

    offset: int = 0
    min_score: float | None = None
    autocut: bool = False
    image_filter: ImageFilter = field(default_factory=ImageFilter)
    thumbnails: bool = False  # a presigned URL of each hit's thumbnail

    def check(self) -> None:
        if not 0 <= self.offset <= MAX_OFFSET:
            raise InvalidParameter("offset", f"must be between 0 and {MAX_OFFSET}, got {self.offset}")
        if self.min_score is not None and not (math.isfinite(self.min_score) and -1 <= self.min_score <= 1):
            raise InvalidParameter("min_score", f"must be a cosine between -1 and 1, got {self.min_score}")
        prefix = self.image_filter.key_prefix
        if prefix is not None:
            if len(prefix) > MAX_PREFIX_CHARS or any(ord(char) < 32 or char == "\\" for char in prefix):
                raise InvalidParameter(
                    "prefix", f"at most {MAX_PREFIX_CHARS} characters, no control characters or backslashes"
                )
            if prefix.startswith("/") or ".." in prefix.split("/"):
                raise InvalidParameter("prefix", "a folder relative to the dataset, without a leading '/' or '..'")
        since, until = self.image_filter.since, self.image_filter.until
        for name, moment in (("since", since), ("until", until)):
            if moment is not None and moment.tzinfo is None:
                raise InvalidParameter(name, "give a time zone, e.g. 2026-01-31T00:00:00Z")
        if since is not None and until is not None and since >= until:
            raise InvalidParameter("until", "must be after since")


@dataclass(frozen=True)
class QueryTerm:
    """One weighted part of a combined query: exactly one of a text, an image's bytes or a stored key."""

    weight: float
    text: str | None = None
    image: bytes | None = None
    key: str | None = None


def check_terms(terms: Sequence[QueryTerm]) -> None:
    if not 1 <= len(terms) <= MAX_TERMS:
        raise InvalidParameter("terms", f"give between 1 and {MAX_TERMS} terms, got {len(terms)}")
    for position, term in enumerate(terms):
        given = [kind for kind, value in (("text", term.text), ("image", term.image), ("key", term.key))
                 if value is not None]
        if len(given) != 1:
            raise InvalidParameter("terms", f"term {position}: give exactly one of text, image_base64 and key")
        if not (math.isfinite(term.weight) and term.weight != 0 and abs(term.weight) <= MAX_TERM_WEIGHT):
            raise InvalidParameter(
                "terms", f"term {position}: weight must be non-zero, at most {MAX_TERM_WEIGHT} either way"
            )
        if term.text is not None and not term.text.strip():
            raise InvalidParameter("terms", f"term {position}: text is empty")
    if all(term.weight < 0 for term in terms):
        raise InvalidParameter("terms", "at least one term needs a positive weight")


@dataclass(frozen=True)
class SearchHit:
    rank: int
    score: float
    image_id: int
    key: str
    path: str  # the source path recorded at ingest, else the s3:// URI
    url: str | None = None
    thumbnail: str | None = None


@dataclass(frozen=True)
class SearchResult:
    dataset: str
    model_id: str
    k: int
    hits: Sequence[SearchHit]
    truncated: bool = False
    offset: int = 0
    autocut_at: int | None = None  # how many ranked hits autocut kept, counted from the first


@dataclass(frozen=True)
class DuplicateGroup:
    """Images whose vectors are at least `min_score` apart from one of the others (linked transitively)."""

    hits: Sequence[SearchHit]  # rank is the position in the group; score is the best link to another member


@dataclass(frozen=True)
class DuplicateReport:
    dataset: str
    model_id: str
    min_score: float
    groups: Sequence[DuplicateGroup]
