"""Request and response models of the HTTP API (pydantic): validated by Powertools, documented in OpenAPI."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from clipsearch.search_results import (
    DEFAULT_K,
    MAX_K,
    MAX_OFFSET,
    MAX_PREFIX_CHARS,
    MAX_TERM_WEIGHT,
    MAX_TERMS,
)

MAX_QUERY_CHARS = 10_000
# A bad value of one of these answers 400 with the code invalid_<parameter> (http.errors).
NAMED_PARAMETERS = frozenset({"offset", "min_score", "autocut", "terms", "prefix", "since", "until"})

OFFSET_DESCRIPTION = (
    "How many ranked results to skip: page n of size k is offset n*k. Pages of one ranking (by score, then "
    "image id) neither overlap nor skip while the dataset does not change."
)
MIN_SCORE_DESCRIPTION = "Leave out results whose cosine score is below this (-1 to 1)."
AUTOCUT_DESCRIPTION = (
    "Stop at the largest drop between two consecutive scores among the first offset + k results (as "
    "Weaviate's autocut). Limits: it judges only those results, so it can cut differently for another k or "
    "offset; with fewer than 3 results it keeps them all; when scores fall evenly the cut is arbitrary."
)
PREFIX_DESCRIPTION = (
    "Only images whose key, relative to datasets/<dataset>/, starts with this (a folder: 'trips/2024/')."
)
SINCE_DESCRIPTION = "Only images ingested at or after this time (ISO 8601 with a time zone)."
UNTIL_DESCRIPTION = "Only images ingested before this time (ISO 8601 with a time zone)."

_ISO_8601_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_8601_text(value: object) -> object:
    """pydantic alone reads 5, 1.5 and "5" as seconds since 1970: only ISO 8601 date-time text passes on."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO_8601_DATE_TIME.match(value):
        raise ValueError("must be an ISO 8601 date and time with a time zone, e.g. 2024-05-01T12:00:00Z")
    return value


IsoDateTime = Annotated[AwareDatetime, BeforeValidator(_iso_8601_text)]


class QueryTermIn(BaseModel):
    """One weighted term of a combined query: exactly one of text, image_base64 and key."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, min_length=1, max_length=MAX_QUERY_CHARS)
    image_base64: str | None = Field(None, description="An image file, base64-encoded.")
    key: str | None = Field(None, description="Key of an image of this dataset: datasets/<dataset>/...")
    weight: float = Field(
        1.0, ge=-MAX_TERM_WEIGHT, le=MAX_TERM_WEIGHT, allow_inf_nan=False,
        description="Non-zero; negative to move away from this term.",
    )

    @model_validator(mode="after")
    def one_kind(self) -> QueryTermIn:
        if sum(value is not None for value in (self.text, self.image_base64, self.key)) != 1:
            raise ValueError("give exactly one of text, image_base64 and key")
        if self.weight == 0:
            raise ValueError("weight must not be 0")
        return self


class TextSearchRequest(BaseModel):
    """A text query, or a weighted list of terms (texts, images, stored keys): exactly one of `query` and `terms`."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, min_length=1, max_length=MAX_QUERY_CHARS, description="What to look for.")
    terms: list[QueryTermIn] | None = Field(
        None, min_length=1, max_length=MAX_TERMS,
        description='Query arithmetic: [{"text": "beach", "weight": 1}, {"text": "people", "weight": -0.5}].',
    )
    # strict: a JSON integer only, never "5", 3.0 or true
    k: int = Field(
        DEFAULT_K, ge=1, le=MAX_K, strict=True, description="How many results (fewer if the dataset is smaller)."
    )
    offset: int = Field(0, ge=0, le=MAX_OFFSET, strict=True, description=OFFSET_DESCRIPTION)
    min_score: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False, description=MIN_SCORE_DESCRIPTION)
    autocut: bool = Field(False, strict=True, description=AUTOCUT_DESCRIPTION)
    prefix: str | None = Field(None, max_length=MAX_PREFIX_CHARS, description=PREFIX_DESCRIPTION)
    since: IsoDateTime | None = Field(None, description=SINCE_DESCRIPTION)
    until: IsoDateTime | None = Field(None, description=UNTIL_DESCRIPTION)

    @model_validator(mode="after")
    def query_or_terms(self) -> TextSearchRequest:
        if (self.query is None) == (self.terms is None):
            raise ValueError("give exactly one of query and terms")
        return self


class ImageSearchRequest(BaseModel):
    """The JSON form of an image query: exactly one of `image_base64` and `key`."""

    model_config = ConfigDict(extra="forbid")

    image_base64: str | None = Field(None, description="The image file, base64-encoded.")
    key: str | None = Field(None, description="Key of an image of this dataset: datasets/<dataset>/...")
    k: int | None = Field(None, ge=1, le=MAX_K, strict=True, description="Overrides the k query parameter.")

    @model_validator(mode="after")
    def one_image(self) -> ImageSearchRequest:
        if (self.image_base64 is None) == (self.key is None):
            raise ValueError("give exactly one of image_base64 and key")
        return self


class SearchHitOut(BaseModel):
    rank: int
    score: float = Field(description="Cosine similarity.")
    path: str = Field(description="The source path recorded at ingest, else the s3:// URI.")
    key: str
    url: str | None = Field(None, description="A presigned GET URL, with ?presign=true.")
    thumbnail: str | None = Field(
        None, description="A presigned GET URL (15 minutes) of a WebP preview, longest side 320 px, with ?thumbnails=true."
    )


class SearchResponse(BaseModel):
    dataset: str
    model: str
    k: int
    offset: int = Field(0, description="How many ranked results this page skipped.")
    results: list[SearchHitOut]
    took_ms: float
    truncated: bool = Field(False, description="The query was longer than the model's context and was cut.")
    autocut_at: int | None = Field(
        None, description="With autocut: how many ranked results it kept, counted from the first."
    )


class DuplicateOut(BaseModel):
    path: str = Field(description="The source path recorded at ingest, else the s3:// URI.")
    key: str
    score: float = Field(description="The best cosine between this image and another of its group.")


class DuplicateGroupOut(BaseModel):
    images: list[DuplicateOut]


class DuplicatesResponse(BaseModel):
    dataset: str
    model: str
    min_score: float
    groups: list[DuplicateGroupOut] = Field(description="Biggest groups first; images in a group by key.")
    took_ms: float


class DeletionOut(BaseModel):
    requested_at: datetime
    objects_deleted: int = Field(description="Bucket objects (images, thumbnails, segments) removed so far.")
    rows_deleted: int = Field(description="Catalog image rows removed so far (after the objects).")
    progress_at: datetime | None = Field(description="When the deletion last made progress.")


class DatasetOut(BaseModel):
    name: str
    model: str
    index_version: int
    status: Literal["active", "deleting"] = Field(
        description="'deleting' from the DELETE on: search answers 409 dataset_deleting, uploads wait."
    )
    counts: dict[str, int] = Field(description="Images by status: pending, indexed, failed, deleted.")
    created_at: datetime
    updated_at: datetime
    deletion: DeletionOut | None = Field(None, description="The deletion's progress while status is 'deleting'.")


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


class FailureOut(BaseModel):
    key: str
    reason: str
    failed_at: datetime


class DatasetDetail(DatasetOut):
    recent_failures: list[FailureOut]


class DatasetDeletionAccepted(BaseModel):
    dataset: str
    status: Literal["deleting"]
    location: str = Field(description="Poll it (GET): status 'deleting' with progress, then 404 once gone.")
    deletion: DeletionOut


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
