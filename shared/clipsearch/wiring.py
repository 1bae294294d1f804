"""The one place that builds real adapters and services from Settings, once per execution environment.

Handlers call these factories; tests build services from adapters directly.
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING, TypeVar

from clipsearch.config import Settings

if TYPE_CHECKING:
    from clipsearch.adapters.postgres_connection import Database
    from clipsearch.adapters.s3_store import S3ObjectStore

# Adapters (boto3, psycopg, faiss, onnxruntime) are imported inside the factories: the search function's
# init thread starts before any of them is imported, and each function imports only what it uses.

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The GIL switch interval while the search function starts. Its init threads download, hash and map files in
# many short calls that each release the GIL and must win it back from the imports running beside them, a
# wait of up to the interval every time: hashing the 64 MB text graph beside one busy Python thread took
# 0.56-0.83 s with CPython's 5 ms and 0.195 s with 0.5 ms (0.17 s alone; 2 shared cores).
STARTING_SWITCH_INTERVAL_S = 0.0005
_NORMAL_SWITCH_INTERVAL_S = sys.getswitchinterval()  # restored after init (a second start cannot take 0.5 ms for it)


def once(factory: Callable[[], T]) -> Callable[[], T]:
    """An execution environment's one instance: built by the first caller while concurrent callers wait
    (the search function's init threads and its first request ask together), cached afterwards.
    `cache_clear` forgets it (tests)."""
    cached = lru_cache(maxsize=1)(factory)
    building = threading.Lock()

    @functools.wraps(factory)
    def get() -> T:
        with building:
            return cached()

    get.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    get.cache_info = cached.cache_info  # type: ignore[attr-defined]
    return get


@once
def get_settings() -> Settings:
    return Settings.from_env()


def service_client(service: str, settings: Settings):
    """The functions' client for `service` (clipsearch.aws), pointed at the local endpoint when one is configured.

    Services without a clipsearch setting (Secrets Manager) take botocore's own endpoint configuration,
    e.g. AWS_ENDPOINT_URL_SECRETS_MANAGER; unset, that is AWS.
    """
    from clipsearch.aws import aws_client

    endpoint = {"s3": settings.s3_endpoint_url, "sqs": settings.sqs_endpoint_url,
                "lambda": settings.lambda_endpoint_url}.get(service)
    return aws_client(service, settings.region, endpoint)


def build_object_store(settings: Settings) -> S3ObjectStore:
    from clipsearch.adapters.s3_store import S3ObjectStore

    return S3ObjectStore(service_client("s3", settings), settings.bucket)


def build_database(settings: Settings) -> Database:
    from clipsearch.adapters.postgres_connection import Database, conninfo_from_secret

    if settings.database_url:
        return Database(settings.database_url)

    def from_secret() -> str:
        secret = service_client("secretsmanager", settings).get_secret_value(SecretId=settings.db_secret_arn)
        return conninfo_from_secret(secret["SecretString"])

    return Database(from_secret)


@once
def get_object_store() -> S3ObjectStore:
    return build_object_store(get_settings())


@once
def get_database() -> Database:
    return build_database(get_settings())


# --- search and dataset functions -----------------------------------------------------------------
# Imports inside the factories: the datasets function never pays for onnxruntime or faiss.


@once
def get_model_cache():
    from clipsearch.model_cache import ModelCache

    return ModelCache(get_object_store(), get_settings().model_cache_dir)


@once
def get_search_text_encoder():
    """The search function's text encoder (Lazy): built by the first request that needs it, or earlier
    by start_search_function. Its files are requested before onnxruntime and the tokenizer are imported,
    and those imports run while the files download."""
    from clipsearch.lazy import Lazy

    def build():
        from clipsearch.model_files import TEXT_GRAPH, TOKENIZER

        settings = get_settings()
        cache = get_model_cache()
        cache.model_files(settings.model_id, [])  # the manifest first: a missing model fails once, at once
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="text-model-files") as pool:
            graph_files = pool.submit(cache.model_files, settings.model_id, [TEXT_GRAPH])
            tokenizer_files = pool.submit(cache.model_files, settings.model_id, [TOKENIZER])
            from clipsearch.encoders import OnnxTextEncoder
            from clipsearch.query_cache import CachedTextEncoder

            # The tokenizer (~2 MB) loads while the graph (~60 MB) downloads: loading it holds the GIL, so
            # beside the session's build it would hold that back instead.
            tokenizer = tokenizer_files.result().tokenizer()
            files = graph_files.result()
        # The template gives the search function 2 threads (one new query: 8.5 vs 10.2 ms p50 on one thread,
        # quiet machine, benchmarks/search.py); unset, one.
        return CachedTextEncoder(OnnxTextEncoder.from_model_files(
            files, settings.onnx_threads or 1, open_now=True, spin_microseconds=settings.text_spin_microseconds,
            tokenizer=tokenizer,
        ))

    return Lazy(build)


@once
def get_search_service():
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.adapters.postgres_catalog import PostgresCatalog
    from clipsearch.encoders import OnnxImageEncoder
    from clipsearch.model_cache import VISION_TOWER_FILES
    from clipsearch.search import SearchService

    settings = get_settings()
    return SearchService(
        catalog=PostgresCatalog(get_database()),
        store=get_object_store(),
        model_id=settings.model_id,
        text_encoder=get_search_text_encoder(),
        image_encoder=lambda: OnnxImageEncoder.from_model_files(
            get_model_cache().model_files(settings.model_id, VISION_TOWER_FILES),
            settings.onnx_threads or None,
            settings.max_query_image_pixels,
        ),
        max_image_bytes=settings.max_request_image_bytes,
        vector_index=FaissVectorIndex(),
        segment_dir=settings.segment_dir,
        index_cache_bytes=settings.index_cache_bytes,
        shard_searcher=build_shard_searcher(settings),
        shard_budget_bytes=settings.shard_budget_bytes,
    )


def start_search_function() -> None:
    """What a search function does as it starts (Lambda's init phase, before its first request), ordered
    for the first text query, whose path is the text model's: build the S3 client, request the model's
    files (a daemon thread downloads them, loads the tokenizer while the graph still downloads, then
    opens the session, onnxruntime releasing the GIL meanwhile), import onnxruntime and `tokenizers` while
    they download, then leave the handler's other imports to overlap the download and the session. A
    second daemon thread builds the search service and opens the catalog connection meanwhile. Python work
    on one thread slows the others' (one GIL), so what the model's path needs comes first, before anything
    competes with it. A failure is logged and left to the first request, which builds again and reports it."""
    from clipsearch.config import ConfigurationError

    try:
        get_settings()
        get_model_cache()
    except Exception as error:  # noqa: BLE001  (the first request reports it)
        if not isinstance(error, ConfigurationError):
            logger.warning("starting the search function failed: %s", error)
        return
    sys.setswitchinterval(STARTING_SWITCH_INTERVAL_S)
    collecting = gc.isenabled()
    # Imports make many objects and few cycles: collections during them are wasted work. Cold start at 100k,
    # process CPU, 3 alternated runs beside other load: 2.47-2.74 s with this, 2.88-3.22 s without.
    gc.disable()
    both_done = threading.Barrier(2, action=lambda: _after_start(collecting))
    threading.Thread(target=_build_text_encoder, args=(both_done,), name="init-text-model", daemon=True).start()
    import clipsearch.encoders  # noqa: F401  (the session's runtime, needed once the files arrive)
    import clipsearch.query_cache  # noqa: F401

    threading.Thread(target=_open_catalog, args=(both_done,), name="init-catalog", daemon=True).start()


def _after_start(collecting: bool) -> None:
    """Both init threads are done: the switch interval back to normal, and the collector back on, with what
    init built (modules, the model session, the service) frozen out of its future full collections."""
    sys.setswitchinterval(_NORMAL_SWITCH_INTERVAL_S)
    if collecting:
        gc.freeze()
        gc.enable()


def _build_text_encoder(done: threading.Barrier) -> None:
    try:
        get_search_text_encoder().get()
    except Exception as error:  # noqa: BLE001  (any failure here is the first request's to report)
        logger.warning("loading the text model during init failed: %s", error)
    finally:
        done.wait()


def _open_catalog(done: threading.Barrier) -> None:
    try:
        get_search_service()
        with get_database().read():
            pass  # connected: the first request's statements find the connection open
    except Exception as error:  # noqa: BLE001  (any failure here is the first request's to report)
        logger.warning("opening the catalog during init failed: %s", error)
    finally:
        done.wait()


def build_shard_searcher(settings: Settings):
    """The shard search function over Lambda, or None when no shard function is configured (no fan-out)."""
    if not settings.shard_function:
        return None
    from clipsearch.adapters.lambda_shards import LambdaShardSearcher

    from clipsearch.aws import aws_client

    # One attempt, and an answer within 20 s (a cold shard maps ~1.5 GB of segments): a shard that cannot
    # answer in time fails the search as a 503 before the search function's own 29 s timeout, not after.
    return LambdaShardSearcher.connecting_on_first_use(
        lambda: aws_client("lambda", settings.region, settings.lambda_endpoint_url, max_attempts=1, timeouts=(2, 20)),
        settings.shard_function,
    )


@once
def get_shard_search_service():
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.adapters.postgres_catalog import PostgresCatalog
    from clipsearch.search import ShardSearchService

    settings = get_settings()
    return ShardSearchService(
        catalog=PostgresCatalog(get_database()),
        store=get_object_store(),
        vector_index=FaissVectorIndex(),
        segment_dir=settings.segment_dir,
        cache_bytes=settings.shard_cache_bytes,
    )


@once
def get_dataset_service():
    """The datasets function's and the deletion worker's: both queue deletion tasks."""
    from clipsearch.adapters.postgres_catalog import PostgresCatalog
    from clipsearch.adapters.sqs_queue import SqsQueue
    from clipsearch.config import ConfigurationError
    from clipsearch.dataset_service import DatasetService

    settings = get_settings()
    if not settings.deletion_queue_url:
        raise ConfigurationError("deleting datasets needs CLIPSEARCH_DELETION_QUEUE_URL (the deletion queue)")
    queue = SqsQueue(service_client("sqs", settings), settings.deletion_queue_url)
    return DatasetService(PostgresCatalog(get_database()), get_object_store(), queue)


# --- ingestion and maintenance functions ----------------------------------------------------------


@once
def get_ingest_service():
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.adapters.postgres_catalog import PostgresCatalog
    from clipsearch.encoders import OnnxImageEncoder
    from clipsearch.ingest import IngestService
    from clipsearch.model_cache import VISION_TOWER_FILES

    settings = get_settings()
    files = get_model_cache().model_files(settings.model_id, VISION_TOWER_FILES)
    encoder = OnnxImageEncoder.from_model_files(
        files, settings.onnx_threads or None, settings.max_image_pixels
    )
    return IngestService(
        get_object_store(),
        PostgresCatalog(get_database()),
        encoder,
        settings.model_id,
        FaissVectorIndex(),
        max_image_bytes=settings.max_ingest_image_bytes,
    )


@once
def get_message_visibility():
    """Hands the preprocessing function's transient failures back sooner than the queue's visibility timeout."""
    from clipsearch.adapters.sqs_queue import SqsMessageVisibility

    return SqsMessageVisibility(service_client("sqs", get_settings()))


@once
def get_compaction_service():
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.adapters.postgres_catalog import PostgresCatalog
    from clipsearch.compaction import CompactionPolicy, CompactionService

    settings = get_settings()
    policy = CompactionPolicy(
        max_segments=settings.compact_max_segments,
        deleted_fraction=settings.compact_deleted_fraction,
        orphan_grace_seconds=settings.orphan_grace_seconds,
        segment_budget_bytes=settings.segment_budget_bytes,
    )
    return CompactionService(get_object_store(), PostgresCatalog(get_database()), policy, FaissVectorIndex())


@once
def get_reconcile_service():
    from clipsearch.adapters.postgres_catalog import PostgresCatalog
    from clipsearch.adapters.sqs_queue import SqsQueue
    from clipsearch.config import ConfigurationError
    from clipsearch.reconcile import ReconcileService

    settings = get_settings()
    if not settings.queue_url:
        raise ConfigurationError("reconciliation needs CLIPSEARCH_QUEUE_URL (the ingestion queue)")
    queue = SqsQueue(service_client("sqs", settings), settings.queue_url)
    return ReconcileService(get_object_store(), PostgresCatalog(get_database()), queue)
