"""Request and response models of the HTTP API (pydantic): validated by Powertools, documented in OpenAPI."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipsearch.search_results import DEFAULT_K, MAX_K

MAX_QUERY_CHARS = 10_000


class TextSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="What to look for.")
    # strict: a JSON integer only, never "5", 3.0 or true
    k: int = Field(
        DEFAULT_K, ge=1, le=MAX_K, strict=True, description="How many results (fewer if the dataset is smaller)."
    )


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


class SearchResponse(BaseModel):
    dataset: str
    model: str
    k: int
    results: list[SearchHitOut]
    took_ms: float
    truncated: bool = Field(False, description="The query was longer than the model's context and was cut.")


class DatasetOut(BaseModel):
    name: str
    model: str
    index_version: int
    counts: dict[str, int] = Field(description="Images by status: pending, indexed, failed, deleted.")
    created_at: datetime
    updated_at: datetime


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


class FailureOut(BaseModel):
    key: str
    reason: str
    failed_at: datetime


class DatasetDetail(DatasetOut):
    recent_failures: list[FailureOut]


class DatasetDeleted(BaseModel):
    dataset: str
    images: int
    segments: int
    objects_deleted: int


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
