"""Settings: read from the environment once, validated, frozen, then passed down as plain values."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from clipsearch.errors import ClipsearchError


class ConfigurationError(ClipsearchError):
    """A setting is missing or malformed."""


# What a search process holds besides its dataset snapshots: Python, onnxruntime, faiss, the int8 text
# and image towers' sessions and a query in flight (peak RSS of benchmarks/search.py at 10k vectors,
# rounded up with margin; docs/SEGMENT_FORMATS.md).
SEARCH_RUNTIME_RESERVE_MB = 1024
# What a shard searcher holds besides its segments: Python, faiss, psycopg and one query, no model (peak RSS
# of a ShardSearchFunction instance with no segment loaded, benchmarks/fanout.py, rounded up with margin).
SHARD_RUNTIME_RESERVE_MB = 512


@dataclass(frozen=True)
class Settings:
    bucket: str
    model_id: str
    database_url: str | None = None  # local and tests; in AWS the secret below is used
    db_secret_arn: str | None = None
    region: str = "us-east-1"
    s3_endpoint_url: str | None = None  # local S3-compatible endpoint; None means AWS
    sqs_endpoint_url: str | None = None
    lambda_endpoint_url: str | None = None  # the local stack's Lambda Invoke API; None means AWS
    queue_url: str | None = None
    deletion_queue_url: str | None = None  # the dataset deletion worker's queue
    model_cache_dir: Path = Path("/tmp/clipsearch/models")
    onnx_threads: int = 0  # 0: onnxruntime's default (all visible cores)
    # The search function's text tower: its workers spin at most this long between operators, and stop
    # when a query's run ends (encoders.create_session); 0: they sleep between operators. Random ViT-B/32
    # int8, 2 threads, 32 texts of ~12 tokens, quiet 2-core AVX2, two runs: p50 12.9 / 12.9 ms asleep, 10.5 /
    # 10.9 ms at 50 us, with 20.8 ms of CPU per query against 21.1-21.4 (unbounded spinning: 11.1 ms, 26 ms CPU).
    # At 50 us a worker fell asleep inside longer operators' gaps: 400 texts, a 48 MB sweep before each run,
    # two runs, p50 8.20 / 8.77 ms at 50 us, 7.45 / 7.83 at 200, 7.44 / 7.72 at 500, 7.39 / 7.97 at 2000; through
    # the handler (benchmarks/search.py, alternated pairs) 1M p50 13.0 / 12.7 ms at 500 against 14.0 / 14.8 at 50.
    text_spin_microseconds: int = 500
    max_image_pixels: int = 80_000_000  # below Pillow's decompression-bomb threshold (89.5 MP)
    # Query images (the search function, per request) get a lower cap: phones store 12 MP (binned 48-200 MP
    # sensors) or 24 MP by default, and a 6 MiB request body holds a JPEG of ~12-25 MP at usual quality; a
    # full-resolution 48-50 MP photo is 12-25 MB, over the body cap anyway. Preparing one query, measured: a
    # 170 KiB 16-bit PNG of 79 MP +245 MiB peak RSS and 1.3 s CPU (an RGB one +305 MiB), 24 MP +88-97 MiB, 0.5 s.
    max_query_image_pixels: int = 24_000_000
    max_request_image_bytes: int = 6 * 1024 * 1024
    max_ingest_image_bytes: int = 50 * 1024 * 1024
    compact_max_segments: int = 8
    compact_deleted_fraction: float = 0.2
    orphan_grace_seconds: int = 3600
    segment_dir: Path = Path("/tmp/clipsearch/segments")  # fetched segment files, memory-mapped from here
    function_memory_mb: int = 0  # the function's MemorySize (Lambda's AWS_LAMBDA_FUNCTION_MEMORY_SIZE); 0: unknown
    index_cache_mb: int = 0  # the search function's snapshot budget; 0: derived from function_memory_mb
    search_memory_mb: int = 0  # the search function's MemorySize, as compaction sizes segments for it; 0: unknown
    shard_function: str | None = None  # the shard search function the search function fans out to; None: never
    shard_memory_mb: int = 0  # that function's MemorySize, as the search function plans shards for it; 0: unknown

    @property
    def index_cache_bytes(self) -> float:
        """What a search execution environment's dataset snapshots may occupy together: the explicit
        setting, else the function's memory less what the runtime and both towers hold, else unbounded."""
        if self.index_cache_mb:
            return self.index_cache_mb * 2**20
        if self.function_memory_mb:
            return _snapshot_budget_mb(self.function_memory_mb) * 2**20
        return float("inf")

    @property
    def segment_budget_bytes(self) -> float:
        """The most one segment may occupy: what a search function with `search_memory_mb` can hold."""
        return _snapshot_budget_mb(self.search_memory_mb) * 2**20 if self.search_memory_mb else float("inf")

    @property
    def shard_budget_bytes(self) -> float:
        """The most one shard may occupy: what a shard searcher with `shard_memory_mb` can hold."""
        return _shard_budget_mb(self.shard_memory_mb) * 2**20 if self.shard_memory_mb else float("inf")

    @property
    def shard_cache_bytes(self) -> float:
        """What a shard searcher's own loaded segments may occupy: the explicit setting, else its memory
        less its runtime's reserve (the budget the search function plans shards with), else unbounded."""
        if self.index_cache_mb:
            return self.index_cache_mb * 2**20
        return _shard_budget_mb(self.function_memory_mb) * 2**20 if self.function_memory_mb else float("inf")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigurationError(f"environment variable {name} is required")
            return value

        def number(name: str, default: float, kind: type = int):
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            try:
                return kind(raw)
            except ValueError:
                raise ConfigurationError(f"{name}={raw!r} is not a {kind.__name__}") from None

        defaults = cls(bucket="", model_id="")
        settings = cls(
            bucket=required("CLIPSEARCH_BUCKET"),
            model_id=required("CLIPSEARCH_MODEL_ID"),
            database_url=env.get("CLIPSEARCH_DATABASE_URL") or None,
            db_secret_arn=env.get("CLIPSEARCH_DB_SECRET_ARN") or None,
            region=_region(env, defaults.region),
            s3_endpoint_url=env.get("CLIPSEARCH_S3_ENDPOINT_URL") or None,
            sqs_endpoint_url=env.get("CLIPSEARCH_SQS_ENDPOINT_URL") or None,
            lambda_endpoint_url=env.get("CLIPSEARCH_LAMBDA_ENDPOINT_URL") or None,
            queue_url=env.get("CLIPSEARCH_QUEUE_URL") or None,
            deletion_queue_url=env.get("CLIPSEARCH_DELETION_QUEUE_URL") or None,
            model_cache_dir=Path(env.get("CLIPSEARCH_MODEL_CACHE_DIR") or defaults.model_cache_dir),
            onnx_threads=number("CLIPSEARCH_ONNX_THREADS", defaults.onnx_threads),
            text_spin_microseconds=number("CLIPSEARCH_TEXT_SPIN_MICROSECONDS", defaults.text_spin_microseconds),
            max_image_pixels=number("CLIPSEARCH_MAX_IMAGE_PIXELS", defaults.max_image_pixels),
            max_query_image_pixels=number(
                "CLIPSEARCH_MAX_QUERY_IMAGE_PIXELS", defaults.max_query_image_pixels
            ),
            max_request_image_bytes=number(
                "CLIPSEARCH_MAX_REQUEST_IMAGE_BYTES", defaults.max_request_image_bytes
            ),
            max_ingest_image_bytes=number(
                "CLIPSEARCH_MAX_INGEST_IMAGE_BYTES", defaults.max_ingest_image_bytes
            ),
            compact_max_segments=number("CLIPSEARCH_COMPACT_MAX_SEGMENTS", defaults.compact_max_segments),
            compact_deleted_fraction=number(
                "CLIPSEARCH_COMPACT_DELETED_FRACTION", defaults.compact_deleted_fraction, float
            ),
            orphan_grace_seconds=number("CLIPSEARCH_ORPHAN_GRACE_SECONDS", defaults.orphan_grace_seconds),
            segment_dir=Path(env.get("CLIPSEARCH_SEGMENT_DIR") or defaults.segment_dir),
            function_memory_mb=number("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", defaults.function_memory_mb),
            index_cache_mb=number("CLIPSEARCH_INDEX_CACHE_MB", defaults.index_cache_mb),
            search_memory_mb=number("CLIPSEARCH_SEARCH_MEMORY_MB", defaults.search_memory_mb),
            shard_function=env.get("CLIPSEARCH_SHARD_FUNCTION") or None,
            shard_memory_mb=number("CLIPSEARCH_SHARD_MEMORY_MB", defaults.shard_memory_mb),
        )
        return settings._with_catalog()

    @classmethod
    def catalog_from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Only what reaching the catalog takes (the URL or the secret, and the region): `clipsearch migrate`."""
        env = os.environ if environ is None else environ
        return cls(
            bucket="",
            model_id="",
            database_url=env.get("CLIPSEARCH_DATABASE_URL") or None,
            db_secret_arn=env.get("CLIPSEARCH_DB_SECRET_ARN") or None,
            region=_region(env, cls.region),
        )._with_catalog()

    def _with_catalog(self) -> Settings:
        if not self.database_url and not self.db_secret_arn:
            raise ConfigurationError(
                "set CLIPSEARCH_DATABASE_URL (local) or CLIPSEARCH_DB_SECRET_ARN (AWS Secrets Manager)"
            )
        return self

    def with_overrides(self, **changes) -> Settings:
        return replace(self, **changes)


def _snapshot_budget_mb(memory_mb: int) -> int:
    return max(SEARCH_RUNTIME_RESERVE_MB, memory_mb - SEARCH_RUNTIME_RESERVE_MB)


def _shard_budget_mb(memory_mb: int) -> int:
    return max(SHARD_RUNTIME_RESERVE_MB, memory_mb - SHARD_RUNTIME_RESERVE_MB)


def _region(env: Mapping[str, str], default: str) -> str:
    """The region as Lambda (AWS_REGION) or a user's shell (AWS_DEFAULT_REGION) gives it."""
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or default
