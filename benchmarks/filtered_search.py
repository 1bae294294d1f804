"""Benchmark filtered search (issue 9): a folder or time-range filter against the same query unfiltered.

100k clustered 512-d vectors, stored as the one segment compaction would write at that size (ivf_sq8), with
one catalog row per vector in a throwaway PostgreSQL and the segment in a moto S3 endpoint over HTTP, twice:
dataset `filteru` puts image i in folder f<i % 10>/ (a folder uncorrelated with the clusters) and gives it
an ingest time of base + i seconds; dataset `filterc` puts each image in the folder of its cluster
(f<cluster % 10>/, a folder of a few subjects). A fresh process imports functions/search/app.py and answers
HTTP API v2 text queries, unfiltered and filtered, interleaved, each with a cached query text (the text query
cache answers the tower) and with a new one (the tower runs); each filtered query once as a first use (the
function's kept filter selections cleared, so the catalog is asked) and once repeated (the next page of the
same folder). It also times the filter's parts alone: the catalog's id query (wall, PostgreSQL backend CPU,
client CPU; a folder prefix reads the folder index of migration 005) against the key range over the images' rows
it replaced, the form before that and the key range's index scan alone, the selection's build, the kept lookup,
FAISS; and prints the first use's catalog query apart.
This process then scores the handler's answers against exact filtered search on the float vectors, and
compares the segment's filtered search with FAISS's own selector on the plain probe (the former way).

    .venv/bin/python benchmarks/filtered_search.py [--queries 200] [--vacuum]

Built segments are cached under /tmp/bench-cache/filter/ (the first run builds two, ~1 minute each).
Needs the int8 ViT-B/32 model directory, as benchmarks/search.py (exported when missing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from bench_common import REPO, TEXT_QUERIES, cpu_description, peak_rss_mib
from search import (
    DEFAULT_MODEL,
    DIM,
    K,
    _clustered,
    _environment,
    _latencies,
    _log,
    _model_dir,
    _model_id,
    _services,
    _store,
    _upload_model,
)

SIZE = 100_000
CLUSTERS = 1000  # _clustered's default
FOLDERS = 10
CACHE = Path("/tmp/bench-cache/filter")
INGEST_BASE = datetime(2026, 1, 1, tzinfo=timezone.utc)
# Every filtered request: (label, dataset, filter fields of the request body).
VARIANTS = [
    ("unfiltered", "filteru", {}),
    ("prefix f3/ (10%, uncorrelated)", "filteru", {"prefix": "f3/"}),
    ("since/until (10%)", "filteru", {"since": (INGEST_BASE + timedelta(seconds=30_000)).isoformat(),
                                      "until": (INGEST_BASE + timedelta(seconds=40_000)).isoformat()}),
    ("prefix f3/img0001 (100 images)", "filteru", {"prefix": "f3/img0001"}),
    ("prefix f3 (10%, ends inside a folder name)", "filteru", {"prefix": "f3"}),
    ("unfiltered (clustered folders)", "filterc", {}),
    ("prefix f3/ (10%, = clusters)", "filterc", {"prefix": "f3/"}),
]


def main() -> int:
    args = _parser().parse_args()
    if args.child:
        return _child(args)
    print(f"CPU: {cpu_description()}", flush=True)
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    model_dir = _model_dir(args.model)
    vectors = _clustered(SIZE, seed=SIZE)
    folders = {"filteru": np.arange(SIZE) % FOLDERS, "filterc": _cluster_of(vectors, seed=SIZE) % FOLDERS}
    with _services() as (endpoint, database_url), tempfile.TemporaryDirectory(prefix="filter-bench-") as scratch:
        from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
        from clipsearch.adapters.postgres_connection import Database

        environment = _environment(endpoint, database_url, model_dir, Path(scratch))
        store = _store(environment)
        _upload_model(store, model_dir, _model_id(model_dir))
        database = Database(database_url)
        migrate(database)
        catalog = PostgresCatalog(database)
        ids, kinds = {}, {}
        for dataset, folder in folders.items():
            ids[dataset], kinds[dataset] = _index_dataset(catalog, database, store, dataset, _model_id(model_dir),
                                                          vectors, folder)
        if args.vacuum:
            _vacuum(database_url)
        child = _run_child(environment, args, Path(scratch))
        database.close()
    segment_rows = _segment_comparison(vectors, ids["filteru"], folders)
    _print(child, _handler_recall(child, vectors, folders), segment_rows, kinds)
    return 0


# --- data --------------------------------------------------------------------------------------------


def _cluster_of(vectors: np.ndarray, seed: int) -> np.ndarray:
    """Each vector's cluster: the nearest of _clustered's centres (its generator draws them first)."""
    centres = np.random.default_rng(seed).standard_normal((CLUSTERS, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return np.concatenate([np.argmax(part @ centres.T, axis=1) for part in np.array_split(vectors, 10)])


def _key(folder: int, position: int) -> str:
    return f"f{folder}/img{position:07d}.jpg"


def _position_of(key: str) -> int:
    return int(key.rsplit("/img", 1)[1].split(".")[0])


def _matching(variant_filter: dict, folder: np.ndarray) -> np.ndarray:
    """Positions (image numbers) a filter admits, computed here without the catalog."""
    positions = np.arange(SIZE)
    admitted = np.ones(SIZE, dtype=bool)
    if "prefix" in variant_filter:
        prefix = variant_filter["prefix"]
        admitted &= np.array([_key(f, i).startswith(prefix) for f, i in zip(folder.tolist(), positions.tolist())])
    if "since" in variant_filter:
        seconds = positions  # image i was ingested at INGEST_BASE + i seconds
        since = (datetime.fromisoformat(variant_filter["since"]) - INGEST_BASE).total_seconds()
        until = (datetime.fromisoformat(variant_filter["until"]) - INGEST_BASE).total_seconds()
        admitted &= (seconds >= since) & (seconds < until)
    return np.nonzero(admitted)[0]


def _index_dataset(catalog, database, store, dataset: str, model_id: str, vectors: np.ndarray,
                   folder: np.ndarray) -> tuple[np.ndarray, str]:
    """One catalog row per vector (key in its folder, ingest time base + i s) and one committed segment."""
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.config import Settings
    from clipsearch.datasets import image_key, segment_key
    from clipsearch.ports import IndexedImage, NewImage, NewSegment
    from clipsearch.segments import SegmentVectors, choose_index

    started = time.perf_counter()
    row = catalog.ensure_dataset(dataset, model_id)
    claims = catalog.claim_images(row.id, [
        NewImage(store.bucket, image_key(dataset, _key(f, i)), f"etag{i}", f"/photos/{_key(f, i)}", "0" * 64, 1000)
        for i, f in enumerate(folder.tolist())
    ])
    ids = np.empty(SIZE, dtype=np.int64)
    ids[[_position_of(claim.key) for claim in claims]] = [claim.id for claim in claims]
    with database.transaction() as connection:
        connection.execute(
            "UPDATE images SET created_at = %s + substring(object_key from 'img([0-9]+)')::int * interval '1 second' "
            "WHERE dataset_id = %s",
            (INGEST_BASE, row.id),
        )
    budget = Settings(bucket="", model_id="", search_memory_mb=3008).segment_budget_bytes
    spec = choose_index(SIZE, budget)
    ids_digest = hashlib.sha256(ids.tobytes()).hexdigest()[:12]  # the segment holds these ids, in this order
    cached = CACHE / f"{dataset}-{SIZE}-{ids_digest}-{spec.kind}-{spec.lists}-{spec.probes}.faiss"
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        building = cached.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp")
        FaissVectorIndex().write(SegmentVectors(ids, vectors), spec, building)
        building.rename(cached)
    segment_id = uuid.uuid4().hex
    segment = NewSegment(segment_id, segment_key(dataset, segment_id), SIZE, spec.kind)
    store.put(segment.object_key, cached.read_bytes())
    catalog.commit_batch(row.id, segment, [IndexedImage(int(i), 640, 480) for i in ids], [])
    _log(f"{dataset}: {SIZE} rows and one {spec.kind} segment ({spec.lists} lists, nprobe {spec.probes}) "
         f"in {time.perf_counter() - started:.1f} s")
    return ids, f"{spec.kind}, {spec.lists} lists, nprobe {spec.probes}"


def _vacuum(database_url: str) -> None:
    """The catalog as autovacuum leaves it some time after an ingest: the visibility map set, so the filter
    indexes answer with index-only scans (right after 100k rows changed status, each id is also read from
    the table)."""
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("VACUUM (ANALYZE) images")
    _log(f"VACUUM (ANALYZE) images in {time.perf_counter() - started:.1f} s")


# --- the search function in a fresh process ------------------------------------------------------------


def _run_child(environment: dict, args, scratch: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--queries", str(args.queries),
               "--model", str(args.model)] + (["--vacuum"] if args.vacuum else [])
    child_environment = {
        **os.environ, **environment,
        "CLIPSEARCH_MODEL_CACHE_DIR": str(scratch / "model-cache"),
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008",
        "CLIPSEARCH_SEGMENT_DIR": str(scratch / "segments"),
    }
    _log("running the search function")
    completed = subprocess.run(command, env=child_environment, capture_output=True, text=True, cwd=REPO, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"child failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# Each filtered variant is timed twice per round: its first use (the search function's kept selections cleared
# before, so the catalog is asked, as for a new folder or a new dataset version) and repeated (the next page).
USES = ("first use", "repeated")
TEXTS = ("cached text", "new text")  # the text query cache answers the tower, or the tower runs


def _child(args) -> int:
    from clipsearch.wiring import get_search_service

    call = _handler()
    for label, dataset, variant_filter in VARIANTS:  # warm: encoder, both snapshots, layouts
        call(dataset, TEXT_QUERIES[0], variant_filter)
    # The benchmark reaches into the service to make every first use a real one; requests never clear it.
    kept_selections = get_search_service()._filter_selections
    cpu_started = time.process_time()
    durations: dict[tuple[str, str, str], list[float]] = {}
    cpu_ms: dict[tuple[str, str, str], list[float]] = {}  # this thread's CPU: what the load of others cannot inflate
    counts: dict[str, list[int]] = {label: [] for label, _, _ in VARIANTS}
    keys: dict[str, dict[str, list[str]]] = {label: {} for label, _, _ in VARIANTS}
    repeats_agree = True
    calls = 0
    for position in range(args.queries):  # interleaved, so load from other processes hits every variant alike
        for text in TEXTS:
            for number, (label, dataset, variant_filter) in enumerate(VARIANTS):
                cached_query = TEXT_QUERIES[position % len(TEXT_QUERIES)]
                first_keys = None
                for use in (USES if variant_filter else ("unfiltered",)):
                    query = cached_query if text == "cached text" else f"{cached_query} {position} {number} {use}"
                    if use == "first use":
                        kept_selections.clear()
                    started, cpu_started_here = time.perf_counter(), time.thread_time()
                    results = call(dataset, query, variant_filter)
                    durations.setdefault((label, text, use), []).append((time.perf_counter() - started) * 1000)
                    cpu_ms.setdefault((label, text, use), []).append((time.thread_time() - cpu_started_here) * 1000)
                    calls += 1
                    found = [result["key"] for result in results]
                    if text == "cached text":
                        if use == "repeated":
                            repeats_agree = repeats_agree and found == first_keys
                        else:
                            first_keys = found
                            counts[label].append(len(results))
                            keys[label][query] = found
    cpu_s = time.process_time() - cpu_started
    print(json.dumps({
        "latency": [{"label": label, "text": text, "use": use,
                     "p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
                     "cpu_p50": float(np.percentile(cpu_ms[(label, text, use)], 50))}
                    for (label, text, use), values in durations.items()],
        "counts": {label: [min(values), float(np.mean(values))] for label, values in counts.items()},
        "keys": keys,
        "repeats_agree": repeats_agree,
        "cpu_s_per_request": cpu_s / calls,
        "parts": _parts(args.queries),
        "peak_rss_mb": peak_rss_mib(),
        "load_average": os.getloadavg()[0],
        "vacuumed": args.vacuum,
    }))
    return 0


def _handler():
    import importlib.util

    spec = importlib.util.spec_from_file_location("search_app", REPO / "functions" / "search" / "app.py")
    function = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(function)
    context = types.SimpleNamespace(
        function_name="search", function_version="$LATEST", memory_limit_in_mb=3008,
        invoked_function_arn="arn:aws:lambda:us-east-1:000000000000:function:search", aws_request_id="bench",
    )

    def call(dataset: str, query: str, variant_filter: dict) -> list[dict]:
        path = f"/datasets/{dataset}/search/text"
        event = {
            "version": "2.0", "routeKey": f"POST {path}", "rawPath": path, "rawQueryString": "",
            "headers": {"content-type": "application/json"}, "isBase64Encoded": False,
            "body": json.dumps({"query": query, "k": K, **variant_filter}),
            "requestContext": {"http": {"method": "POST", "path": path}, "stage": "$default"},
        }
        response = function.handler(event, context)
        if response["statusCode"] != 200:
            raise RuntimeError(f"search failed: {response}")
        return json.loads(response["body"])["results"]

    return call


def _parts(count: int) -> dict[str, dict[str, float]]:
    """Each filtered variant's parts, timed alone (p50 ms, and mean CPU ms of the PostgreSQL backend and of
    this process for the catalog): the catalog's id query as the search function asks it (a folder prefix: the
    folder index), the key range over the images' rows it replaced for folders, the form before that (LIKE,
    int8[] as text in a transaction), the key range's index scan alone (count(*)), the selection's build, the kept
    selection's lookup, the segment search with it; next to the text tower and the unfiltered segment search."""
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.adapters.postgres_catalog import PostgresCatalog
    from clipsearch.config import Settings
    from clipsearch.datasets import dataset_prefix
    from clipsearch.encoders import OnnxTextEncoder
    from clipsearch.filter_selections import FilterSelections
    from clipsearch.model_files import ModelFiles
    from clipsearch.search_results import ImageFilter
    from clipsearch.wiring import build_database, build_object_store

    settings = Settings.from_env()
    encoder = OnnxTextEncoder.from_model_files(ModelFiles.open(settings.model_cache_dir / settings.model_id), threads=1)
    database = build_database(settings)
    catalog = PostgresCatalog(database)
    store = build_object_store(settings)
    vector_index = FaissVectorIndex()
    queries = [encoder.embed_text(text).vector[None] for text in TEXT_QUERIES]
    rounds = [queries[i % len(queries)] for i in range(count)]
    segments = {}
    for dataset in {dataset for _, dataset, _ in VARIANTS}:
        path = settings.segment_dir / f"{dataset}.parts.faiss"
        path.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(catalog.live_segments(catalog.get_dataset(dataset).id)[0].object_key, path)
        segments[dataset] = vector_index.open(path)
    with database.read() as connection:
        backend = connection.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
    parts = {"text tower": {"ms": _p50(lambda text: encoder.embed_text(text), TEXT_QUERIES * (count // 8 + 1))}}
    for label, dataset, variant_filter in VARIANTS:
        segment = segments[dataset]
        if not variant_filter:
            parts[label] = {"faiss search": _p50(lambda query: segment.search(query, K), rounds)}
            continue
        row = catalog.get_dataset(dataset)
        key_prefix = dataset_prefix(dataset) + variant_filter["prefix"] if "prefix" in variant_filter else None
        former_prefix = dataset_prefix(dataset) + variant_filter.get("prefix", "")  # the former query always had one
        since, until = (datetime.fromisoformat(variant_filter[name]) if name in variant_filter else None
                        for name in ("since", "until"))
        image_filter = ImageFilter(variant_filter.get("prefix"), since, until)
        ids = catalog.filtered_image_ids(row.id, key_prefix, since, until)
        selection = vector_index.selection(ids)
        segment.search(rounds[0], K, selection)  # the segment's list layout, read once
        kept = FilterSelections(catalog, vector_index)
        deleted = np.array(sorted(catalog.deleted_image_ids(row.id)), dtype=np.int64)
        kept.select(row.id, dataset, row.index_version, image_filter, deleted)
        parts[label] = {
            "matching ids": float(len(ids)),
            **_catalog_costs("catalog id query", backend, count,
                             lambda: catalog.filtered_image_ids(row.id, key_prefix, since, until)),
            **_catalog_costs("key-range id query", backend, count,
                             lambda: _key_range_ids(database, row.id, key_prefix, since, until)),
            **_catalog_costs("former id query", backend, count,
                             lambda: _former_filtered_ids(database, row.id, former_prefix, since, until)),
            **_catalog_costs("index scan alone", backend, count,
                             lambda: _count_matching(database, row.id, key_prefix, since, until)),
            "selection build": _p50(lambda _: vector_index.selection(ids), rounds),
            "kept selection lookup": _p50(lambda _: kept.select(row.id, dataset, row.index_version, image_filter,
                                                                      deleted),
                                          rounds),
            "faiss search": _p50(lambda query: segment.search(query, K, selection), rounds),
        }
    return parts


def _catalog_costs(name: str, backend: int, count: int, query) -> dict[str, float]:
    """p50 wall ms of `query`, and its mean CPU ms in the PostgreSQL backend (from /proc: same machine) and here."""
    query()
    tick = os.sysconf("SC_CLK_TCK")

    def backend_cpu_s() -> float:
        fields = Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    server_started, client_started = backend_cpu_s(), time.thread_time()
    wall = _p50(lambda _: query(), list(range(count)))
    return {name: wall,
            f"{name} server CPU": (backend_cpu_s() - server_started) * 1000 / count,
            f"{name} client CPU": (time.thread_time() - client_started) * 1000 / count}


def _conditions(dataset_id: int, key_prefix: str | None, since, until, as_like: bool) -> tuple[str, list]:
    """The filter's WHERE clause with the prefix as a LIKE (the former way) or as the catalog's key range."""
    from clipsearch.adapters.postgres_catalog import _prefix_upper_bound

    conditions, params = ["dataset_id = %s", "status = 'indexed'"], [dataset_id]
    if as_like:
        conditions.append("object_key COLLATE \"C\" LIKE %s ESCAPE '\\'")
        params.append(key_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
    elif key_prefix is not None:
        conditions.append("object_key COLLATE \"C\" >= %s AND object_key COLLATE \"C\" < %s")
        params += [key_prefix, _prefix_upper_bound(key_prefix)]
    for value, condition in ((since, "created_at >= %s"), (until, "created_at < %s")):
        if value is not None:
            conditions.append(condition)
            params.append(value)
    return " AND ".join(conditions), params


def _former_filtered_ids(database, dataset_id: int, key_prefix: str, since, until) -> np.ndarray:
    """The catalog query before this round: a LIKE prefix, int8[] in text, three round trips, a Python list."""
    where, params = _conditions(dataset_id, key_prefix, since, until, as_like=True)
    with database.transaction() as connection:
        found = connection.execute(f"SELECT array_agg(id) AS ids FROM images WHERE {where}", params).fetchone()
    return np.asarray(found["ids"] or [], dtype=np.int64)


def _key_range_ids(database, dataset_id: int, key_prefix: str | None, since, until) -> np.ndarray:
    """The catalog query before the folder index (migration 005): a key range over the images' rows."""
    from clipsearch.adapters.postgres_catalog import _image_rows_query

    query, params = _image_rows_query(dataset_id, key_prefix, since, until)
    with database.read() as connection, connection.cursor(binary=True) as cursor:
        packed = cursor.execute(query, params).fetchone()["ids"]
    return np.frombuffer(packed or b"", dtype=">i8").astype(np.int64)


def _count_matching(database, dataset_id: int, key_prefix: str | None, since, until) -> int:
    """The catalog query's index scan alone: nothing built, nothing sent but a count."""
    where, params = _conditions(dataset_id, key_prefix, since, until, as_like=False)
    with database.read() as connection:
        return connection.execute(f"SELECT count(*) AS n FROM images WHERE {where}", params).fetchone()["n"]


def _p50(work, inputs: list) -> float:
    return float(np.percentile(_latencies(work, inputs), 50))


# --- scoring -------------------------------------------------------------------------------------------


def _handler_recall(child: dict, vectors: np.ndarray, folders: dict) -> dict[str, float]:
    """recall@10 of each variant's answers against exact search over the float vectors its filter admits,
    the text queries embedded again here by the same encoder the function uses."""
    from clipsearch.encoders import OnnxTextEncoder
    from clipsearch.model_files import ModelFiles

    encoder = OnnxTextEncoder.from_model_files(ModelFiles.open(DEFAULT_MODEL), threads=1)
    recall = {}
    for label, dataset, variant_filter in VARIANTS:
        admitted = _matching(variant_filter, folders[dataset])
        scores = []
        for query, found_keys in child["keys"][label].items():
            vector = np.asarray(encoder.embed_text(query).vector, dtype=np.float32)
            exact = admitted[np.argsort(-(vectors[admitted] @ vector), kind="stable")[:K]]
            found = {_position_of(key) for key in found_keys}
            scores.append(len(found & set(exact.tolist())) / len(exact))
        recall[label] = float(np.mean(scores))
    return recall


def _segment_comparison(vectors: np.ndarray, ids: np.ndarray, folders: dict) -> list[dict]:
    """On 200 near-data queries: the segment's filtered search against FAISS's selector on the plain probe
    (nprobe lists, the former way), both scored against exact filtered search on the float vectors."""
    import faiss
    from clipsearch.adapters.faiss_index import FaissVectorIndex

    rng = np.random.default_rng(7)
    queries = vectors[rng.integers(0, SIZE, 200)] + 0.05 * rng.standard_normal((200, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    vector_index = FaissVectorIndex()
    path = next(CACHE.glob(f"filteru-{SIZE}-{hashlib.sha256(ids.tobytes()).hexdigest()[:12]}-*.faiss"))
    segment = vector_index.open(path)
    inner = faiss.downcast_index(segment._index.index)
    faiss.omp_set_num_threads(1)
    rows = []
    for label, variant_filter, folder in (
        ("folder f3/, uncorrelated (10%)", {"prefix": "f3/"}, folders["filteru"]),
        ("folder f3/ = clusters (10%)", {"prefix": "f3/"}, folders["filterc"]),
        ("prefix f3/img0001 (100 images)", {"prefix": "f3/img0001"}, folders["filteru"]),
        ("prefix f3/img000000 (1 image)", {"prefix": "f3/img000000"}, folders["filteru"]),
    ):
        admitted = _matching(variant_filter, folder)
        selection = vector_index.selection(ids[admitted])
        plain = faiss.SearchParametersIVF(sel=selection.selector, nprobe=inner.nprobe)
        truth = np.argsort(-(queries @ vectors[admitted].T), axis=1)[:, :K]
        for way, search in (
            ("FAISS selector, plain probe", lambda query: segment._index.search(query, K, params=plain)[1][0]),
            ("lists holding selected ids", lambda query: segment.search(query, K, selection)[1]),
        ):
            found = [search(query[None]) for query in queries]
            found = [hits[hits >= 0] for hits in found]
            expected = [set(ids[admitted[row]].tolist()) for row in truth]
            started = time.process_time()
            for query in queries:
                search(query[None])
            rows.append({
                "filter": label, "way": way, "matching": len(admitted),
                "recall": float(np.mean([len(set(hits.tolist()) & want) / len(want) for hits, want in zip(found, expected)])),
                "min_count": min(len(hits) for hits in found), "mean_count": float(np.mean([len(h) for h in found])),
                "cpu_ms": (time.process_time() - started) * 1000 / len(queries),
            })
    return rows


def _print(child: dict, recall: dict, segment_rows: list[dict], kinds: dict) -> None:
    counts = child["counts"]
    latency = {(row["label"], row["text"], row["use"]): row for row in child["latency"]}
    print(f"\n== warm text queries through the search handler, {SIZE:,} vectors, k={K} ==")
    print(f"segments: {kinds}; catalog vacuumed before the queries: {child['vacuumed']}")
    print(f"load average after the run: {child['load_average']:.2f}; CPU per request (all variants): "
          f"{child['cpu_s_per_request'] * 1000:.2f} ms; child peak RSS {child['peak_rss_mb']:.0f} MB; repeated "
          f"filtered queries answered as their first use: {child['repeats_agree']}")
    print("first use: the search function's kept filter selections cleared before the request (the catalog is "
          "asked); repeated: the same filter again at the same dataset version (the next page)")
    print("| query | text | use | p50 ms | p99 ms | p50 / unfiltered | CPU p50 ms | CPU / unfiltered "
          "| recall@10 vs exact filtered | results min / mean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for text in TEXTS:
        for label, dataset, variant_filter in VARIANTS:
            base = latency[("unfiltered" if dataset == "filteru" else "unfiltered (clustered folders)", text,
                            "unfiltered")]
            for use in (USES if variant_filter else ("unfiltered",)):
                row = latency[(label, text, use)]
                print(f"| {label} | {text} | {use if variant_filter else '-'} | {row['p50']:.2f} | {row['p99']:.2f} | "
                      f"{row['p50'] / base['p50']:.2f}x | {row['cpu_p50']:.2f} | {row['cpu_p50'] / base['cpu_p50']:.2f}x"
                      f" | {recall[label]:.3f} | {counts[label][0]} / {counts[label][1]:.1f} |")
    print("\nthe catalog's id query of a first use (timed alone; wall p50, and mean CPU of PostgreSQL + this process):")
    for label, parts in child["parts"].items():
        if "catalog id query" in parts:
            print(f"  {label}: {parts['catalog id query']:.3f} ms ({parts['catalog id query server CPU']:.3f} + "
                  f"{parts['catalog id query client CPU']:.3f} ms CPU) for {parts['matching ids']:.0f} ids; the key range "
                  f"over the images' rows {parts['key-range id query']:.3f} ms")
    print("\nparts, timed alone (p50 ms):")
    for label, parts in child["parts"].items():
        print(f"  {label}: " + ", ".join(f"{name} {value:.3f}" if name != "matching ids" else f"{name} {value:.0f}"
                                         for name, value in parts.items()))
    print("(catalog: wall p50; server CPU and client CPU are means per query, of the PostgreSQL backend and of "
          "this process)")
    print("\n== segment search with a filter, 200 near-data queries, one thread ==")
    print("| filter | matching | way | recall@10 | results min / mean | CPU ms per query |")
    print("|---|---|---|---|---|---|")
    for row in segment_rows:
        print(f"| {row['filter']} | {row['matching']} | {row['way']} | {row['recall']:.3f} | "
              f"{row['min_count']} / {row['mean_count']:.1f} | {row['cpu_ms']:.2f} |")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200, help="warm text queries per variant")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="int8 model directory")
    parser.add_argument("--vacuum", action="store_true",
                        help="VACUUM (ANALYZE) the catalog before querying, as autovacuum would by then")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    sys.exit(main())
