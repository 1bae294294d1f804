"""What a search returns, and its k limits: light types the HTTP layer imports without faiss or onnxruntime."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_K = 1000
DEFAULT_K = 5


@dataclass(frozen=True)
class SearchHit:
    rank: int
    score: float
    image_id: int
    key: str
    path: str  # the source path recorded at ingest, else the s3:// URI
    url: str | None = None


@dataclass(frozen=True)
class SearchResult:
    dataset: str
    model_id: str
    k: int
    hits: Sequence[SearchHit]
    truncated: bool = False
