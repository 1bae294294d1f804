"""Benchmark search: warm p50/p99 (text, image), cold start and peak memory, next to the original project's way.

For each size (clustered synthetic 512-d vectors, stored as the segments compaction would leave (1M: 5 x
200k), with one catalog row per vector in a throwaway PostgreSQL, in a SeaweedFS S3 endpoint over HTTP, as in
the local stack; `--store moto` for moto):
- ours: a fresh process imports functions/search/app.py and answers HTTP API v2 events; cold start is
  process start to first answer with the int8 text tower and the segment fetched from the S3 endpoint;
- baseline: what the original project does per query: encode with PyTorch CLIP (random ViT-B/32, seed 0,
  transformers), read the FAISS file from disk, open a new database connection for the paths;
- scans: the in-memory scan alternatives on the same vectors (FAISS flat with 1 and 2 threads, NumPy
  matrix-vector product, HNSW), to choose how search runs.

    .venv/bin/python benchmarks/search.py [--sizes 10000,100000[,1000000]] [--queries 200]
    .venv/bin/python benchmarks/search.py --formats --sizes 100000   # segment formats only (no services)

Needs the int8 ViT-B/32 model directory (exported when missing:
python -m model_export --random-arch vit-b-32 --seed 0 --quantize int8 --out .cache/models/random-vit-b-32-seed0-int8).
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import logging
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from bench_common import REPO, SEED_EVAL, TEXT_QUERIES, cpu_description, peak_rss_mib

DEFAULT_MODEL = REPO / ".cache" / "models" / "random-vit-b-32-seed0-int8"
DIM = 512
K = 10
LAYOUTS = ("compacted", "hnsw")
CACHE_DIR = Path(os.environ.get("BENCH_CACHE_DIR", "/tmp/bench-cache/search-benchmark"))  # segment files
_TRAIN_POINTS_PER_LIST = 64  # see _write_with_small_training_sample
_SMALL_TRAINING_FROM = 500_000


def main() -> int:
    args = _parser().parse_args()
    if args.child:
        return _child(args)
    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"CPU: {cpu_description()}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    if args.prepare:
        for size in sizes:
            for layout in args.layouts.split(","):
                if layout == "compacted" or size <= args.hnsw_max:
                    vectors = _clustered(size, seed=size)
                    for start, stop in _segment_ranges(size, layout):
                        path = _cached_segment(vectors[start:stop], layout, _id_base(size, layout) + start)[1]
                        _log(f"segment {path} ready")
        return 0
    if args.formats:
        for size in sizes:
            _print_formats(size, _compare_formats(_clustered(size, seed=size), args.formats_skip.split(",")))
        return 0
    model_dir = _model_dir(args.model)
    print(f"function code: {_compile_function_code()}", flush=True)
    rows = []
    with _services(args.store) as (endpoint, database_url), \
            tempfile.TemporaryDirectory(prefix="search-bench-") as scratch:
        from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
        from clipsearch.adapters.postgres_connection import Database

        environment = _environment(endpoint, database_url, model_dir, Path(scratch))
        store = _store(environment)
        _upload_model(store, model_dir, _model_id(model_dir))
        database = Database(database_url)
        migrate(database)
        catalog = PostgresCatalog(database)
        for size in sizes:
            vectors = _clustered(size, seed=size)
            scans = _compare_scans(vectors, args.hnsw_max) if size <= args.scans_max else {}
            prepared = []
            for layout in args.layouts.split(","):
                if layout == "hnsw" and size > args.hnsw_max:
                    continue
                dataset = f"bench{size}{layout}"
                started = time.perf_counter()
                index_type, ids, segment_files = _index_dataset(
                    database, catalog, store, dataset, _model_id(model_dir), vectors, layout
                )
                _log(f"{dataset}: {size} vectors indexed as {len(segment_files)} {index_type} segment(s) in "
                     f"{time.perf_counter() - started:.1f} s")
                recall = _segment_recall(vectors, ids, segment_files)
                _log(f"{dataset}: recall@10 {recall:.4f}")
                search_threads = _segment_search_threads(vectors, segment_files[0])
                baseline_file = None
                if not prepared and size <= args.baseline_max:
                    baseline_file = Path(scratch) / f"{dataset}.faiss"
                    _write_baseline_index(ids, vectors, baseline_file)
                prepared.append((dataset, index_type, recall, baseline_file, search_threads))
            del vectors, ids  # the figures below are the search process's, not the harness's
            gc.collect()
            baseline = None
            for dataset, index_type, recall, baseline_file, search_threads in prepared:
                flushed = _flush_harness_writes(database)
                statistics_before = _catalog_statistics(database)
                maintenance_before = _catalog_maintenance(database)
                ours = _run_child("service", environment, dataset, args, Path(scratch))
                ours["catalog_maintenance"] = _maintenance_during(maintenance_before, _catalog_maintenance(database))
                if baseline_file is not None:
                    baseline = _run_child("baseline", environment, dataset, args, Path(scratch), baseline_file)
                    baseline_file.unlink()
                rows.append({"size": size, "index_type": index_type, "ours": ours, "baseline": baseline,
                             "scans": scans, "recall": recall, "search_threads": search_threads,
                             "catalog_statistics": statistics_before, "harness_writes_flushed": flushed})
                _print_size(rows[-1])
        database.close()
    _print_summary(rows)
    return 0


# --- data --------------------------------------------------------------------------------------------


def _clustered(count: int, seed: int, clusters: int = 1000) -> np.ndarray:
    """Real-like embeddings: tight clusters (approximate indexes look far better or worse on uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
    vectors = np.empty((count, DIM), dtype=np.float32)
    for start in range(0, count, 100_000):
        stop = min(count, start + 100_000)
        chunk = centres[rng.integers(0, clusters, stop - start)]
        chunk += 0.6 * rng.standard_normal(chunk.shape, dtype=np.float32)
        vectors[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return vectors


def _index_dataset(
    database, catalog, store, dataset: str, model_id: str, vectors: np.ndarray, layout: str
) -> tuple[str, np.ndarray, Path]:
    """One catalog row per vector, and the vectors as the segments compaction leaves for a 3008 MB search
    function ("compacted": its kind, at most CompactionPolicy.segment_capacity vectors each, so 1M is
    5 x 200k), or one HNSW segment whatever the size ("hnsw").

    The image ids start at a fixed base per (size, layout), so the segment files, whose builds take
    minutes at 1M, are cached under CACHE_DIR and reused by later runs."""
    from clipsearch.datasets import dataset_prefix, segment_key
    from clipsearch.ports import NewSegment

    row = catalog.ensure_dataset(dataset, model_id)
    base = _id_base(len(vectors), layout)
    paths = []
    for start, stop in _segment_ranges(len(vectors), layout):
        index_type, path = _cached_segment(vectors[start:stop], layout, base + start)
        segment_id = uuid.uuid4().hex
        segment = NewSegment(segment_id, segment_key(dataset, segment_id), stop - start, index_type)
        with path.open("rb") as body:  # streamed: the harness never holds the segment's bytes
            store._client.put_object(Bucket=store.bucket, Key=segment.object_key, Body=body)
        catalog.commit_batch(row.id, segment, [], [])  # the segment row, as ingestion commits it
        # The images' rows as ingestion leaves them (indexed, in that segment), written by the server in one
        # statement: claiming and committing 1M rows through the catalog took minutes on this shared machine.
        with database.transaction() as connection:
            connection.execute(
                "INSERT INTO images (id, dataset_id, bucket, object_key, etag, source_path, sha256, byte_size,"
                " width, height, status, segment_id, attempts)"
                " SELECT %s + n, %s, %s, %s || 'img' || lpad(n::text, 7, '0') || '.jpg', 'etag' || n,"
                " '/data/photos/img' || lpad(n::text, 7, '0') || '.jpg', repeat('0', 64), 1000, 640, 480,"
                " 'indexed', %s, 1 FROM generate_series(%s::bigint, %s::bigint) AS n",
                (base, row.id, store.bucket, dataset_prefix(dataset), segment_id, start, stop - 1),
            )
        paths.append(path)
    with database.transaction() as connection:
        connection.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), %s)", (base + len(vectors),))
    return index_type, base + np.arange(len(vectors), dtype=np.int64), paths


def _segment_ranges(size: int, layout: str) -> list[tuple[int, int]]:
    """[start, stop) of each segment of a dataset of `size` vectors in `layout`."""
    from clipsearch.compaction import CompactionPolicy

    capacity = CompactionPolicy(segment_budget_bytes=_segment_budget()).segment_capacity
    if layout != "compacted" or size <= capacity:
        return [(0, size)]
    return [(start, min(size, start + capacity)) for start in range(0, size, capacity)]


def _segment_budget() -> float:
    from clipsearch.config import Settings

    return Settings(bucket="", model_id="", search_memory_mb=3008).segment_budget_bytes


def _compile_function_code() -> str:
    """The search function's own modules compiled to bytecode, as the deployed layer and function ship them
    (infra/Makefile); PYTHONDONTWRITEBYTECODE in the harness's environment would otherwise have every cold
    start compile them from source (~0.1 s of CPU, holding the GIL, at 100k). Timestamp pycs, beside the
    sources, so an edited module is compiled again."""
    import compileall

    started = time.perf_counter()
    for directory in (REPO / "shared" / "clipsearch", REPO / "functions" / "search"):
        if not compileall.compile_dir(directory, quiet=1, workers=1):
            raise RuntimeError(f"{directory}: compileall failed")
    return f"compiled to bytecode in {time.perf_counter() - started:.2f} s (shared/clipsearch, functions/search)"


def _flush_harness_writes(database) -> str:
    """Writes the harness's catalog rows and uploads to disk before the search process starts, so that they are not
    written back while it is measured. In the 1M new-text run every slow query had the VM's time stolen (150-280 ms in
    a run, 20-60 ms per slow query; p99 37.5-40.4 ms), and the burst followed the disk writes: an os.sync() in the
    search process just before that run took 1.15 s, after which 50 ms were stolen and p99 was 21.7 ms. The search
    process's own downloads are left as the function leaves them."""
    started, stolen = time.perf_counter(), _stolen_ms()
    with database.read() as connection:
        connection.execute("CHECKPOINT")
    os.sync()
    return f"{time.perf_counter() - started:.2f} s, the VM's stolen time meanwhile {_stolen_ms() - stolen:.0f} ms"


def _catalog_statistics(database) -> str:
    """Whether PostgreSQL has planner statistics of `images` yet: right after the harness's bulk insert it
    has none until autovacuum analyzes the table, and a plan chosen without them can read far more."""
    with database.read() as connection:
        row = connection.execute(
            "SELECT c.reltuples, s.n_live_tup, s.last_analyze, s.last_autoanalyze FROM pg_class c"
            " JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.relname = 'images'"
        ).fetchone()
    analyzed = row["last_analyze"] or row["last_autoanalyze"]
    return (f"images: {row['n_live_tup']:,} live rows, planner estimate {max(row['reltuples'], 0):,.0f}, "
            f"{'analyzed at ' + analyzed.strftime('%H:%M:%S') if analyzed else 'never analyzed'}")


def _catalog_maintenance(database) -> dict[str, tuple[int, int]]:
    """Per table, how many times autovacuum has vacuumed and analyzed it: a run during the search process takes
    a core from the measured function (after the harness's bulk insert of `images`, a vacuum of 1M rows)."""
    with database.read() as connection:
        rows = connection.execute(
            "SELECT relname, autovacuum_count, autoanalyze_count FROM pg_stat_user_tables"
            " WHERE relname IN ('images', 'datasets', 'segments', 'image_folders')"
        ).fetchall()
    return {row["relname"]: (row["autovacuum_count"], row["autoanalyze_count"]) for row in rows}


def _maintenance_during(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    runs = [f"{table}: {after[table][0] - vacuums} vacuum, {after[table][1] - analyzes} analyze"
            for table, (vacuums, analyzes) in sorted(before.items())
            if table in after and after[table] != (vacuums, analyzes)]
    return "; ".join(runs) or "none"


def _id_base(size: int, layout: str) -> int:
    """Disjoint id ranges per (size, layout) in one catalog: [10 n, 12 n)."""
    return 10 * size + LAYOUTS.index(layout) * size


def _cached_segment(vectors: np.ndarray, layout: str, base: int) -> tuple[str, Path]:
    """The segment file of `vectors` with ids from `base` on, built once (under the heavy-job lock at 1M)."""
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.segments import HNSW, IndexSpec, SegmentVectors, choose_index

    spec = choose_index(len(vectors), _segment_budget()) if layout == "compacted" else IndexSpec(HNSW)
    path = CACHE_DIR / f"segment-{len(vectors)}-{spec.kind}-{spec.lists}-{base}.faiss"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        partial = path.with_suffix(".partial")
        ids = base + np.arange(len(vectors), dtype=np.int64)
        if len(vectors) >= _SMALL_TRAINING_FROM:
            _write_with_small_training_sample(ids, vectors, spec, partial)
        else:
            FaissVectorIndex().write(SegmentVectors(ids, vectors), spec, partial)
        partial.rename(path)
        _log(f"built {path.name} in {time.perf_counter() - started:.0f} s")
    return spec.kind, path


def _write_with_small_training_sample(ids: np.ndarray, vectors: np.ndarray, spec, destination: Path) -> None:
    """The segment compaction writes (the adapter's own index for `spec`, ids, probe depth, file format), with
    its k-means trained on 64 points per list for 10 iterations instead of compaction's 256 points and 25:
    at 1M that is ~1e13 instead of ~1e14 operations, which a shared 2-core machine cannot spare for every
    change of data. recall@10 is measured on this segment, so a coarser k-means can only lower it."""
    import faiss
    from clipsearch.adapters.faiss_index import _inner_index

    inner = _inner_index(spec, vectors.shape[1])
    inner.cp.niter = 10
    sample = np.random.default_rng(0).choice(len(vectors), spec.lists * _TRAIN_POINTS_PER_LIST, replace=False)
    inner.train(vectors[np.sort(sample)])
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, ids)
    faiss.write_index(index, str(destination))


def _segment_recall(vectors: np.ndarray, ids: np.ndarray, segment_files: list[Path], count: int = 200) -> float:
    """recall@10 of the segment as the search function opens and searches it (memory-mapped, one thread,
    its own probe depth) against exact search on the same vectors, for queries near the data."""
    import faiss
    from clipsearch.adapters.faiss_index import FaissVectorIndex

    rng = np.random.default_rng(7)
    queries = vectors[rng.integers(0, len(vectors), count)] + 0.05 * rng.standard_normal((count, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, nearest = faiss.knn(queries, vectors, K)  # exact; L2 ranks unit vectors as inner product does
    segments = [FaissVectorIndex().open(path) for path in segment_files]
    found = []
    for query in queries:  # each segment's top K, merged by score, as the search function merges them
        answers = [segment.search(query[None], K) for segment in segments]
        scores = np.concatenate([answer[0] for answer in answers])
        hits = np.concatenate([answer[1] for answer in answers])
        found.append(set(hits[np.argsort(-scores, kind="stable")[:K]].tolist()))
    return float(np.mean([len(hits & set(ids[row].tolist())) / K for hits, row in zip(found, nearest)]))


def _segment_search_threads(vectors: np.ndarray, segment_file: Path, count: int = 200) -> dict[str, float]:
    """One query at a time on the segment as the function opens it (memory-mapped): p50 ms with one OpenMP
    thread (as the function searches) against two, which FAISS spreads over the probed inverted lists
    (parallel_mode 1), in interleaved rounds; whether the second core pays depends on how busy it is."""
    import faiss

    index = faiss.read_index(str(segment_file), faiss.IO_FLAG_MMAP_IFC)
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexIVF):
        return {}
    rng = np.random.default_rng(11)
    queries = vectors[rng.integers(0, len(vectors), count)] + 0.05 * rng.standard_normal((count, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    variants = {"1 thread (the function's)": (1, 0), "2 threads over the probed lists": (2, 1)}
    timings: dict[str, list[float]] = {name: [] for name in variants}
    threads_before = faiss.omp_get_max_threads()
    try:
        for query in queries[:20]:  # the lists' pages mapped in before timing
            index.search(query[None], K)
        for start in range(0, count, 20):
            for name, (threads, parallel_mode) in variants.items():
                faiss.omp_set_num_threads(threads)
                inner.parallel_mode = parallel_mode
                timings[name].extend(_latencies(lambda query: index.search(query[None], K), queries[start:start + 20]))
    finally:
        faiss.omp_set_num_threads(threads_before)
    return {f"FAISS search, {name} p50 ms": float(np.percentile(durations, 50)) for name, durations in timings.items()}


def _write_baseline_index(ids: np.ndarray, vectors: np.ndarray, path: Path) -> None:
    """The original project's index: one flat FAISS file on disk with the image ids."""
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.segments import FLAT, IndexSpec, SegmentVectors

    FaissVectorIndex().write(SegmentVectors(ids, vectors), IndexSpec(FLAT), path)


# --- scan alternatives -------------------------------------------------------------------------------


def _compare_scans(vectors: np.ndarray, hnsw_max: int) -> dict[str, float]:
    import faiss
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.segments import HNSW, IndexSpec, SegmentVectors

    rng = np.random.default_rng(7)
    queries = vectors[rng.integers(0, len(vectors), 100)] + 0.05 * rng.standard_normal((100, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(vectors)
    results: dict[str, float] = {}
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        results[f"faiss flat, {threads} thread{'s' if threads > 1 else ''}"] = _p50(
            lambda q: flat.search(q[None], K), queries
        )
    results["numpy matrix-vector"] = _p50(lambda q: np.argpartition(vectors @ q, -K)[-K:], queries)
    if len(vectors) <= hnsw_max:
        started = time.perf_counter()
        ids = np.arange(len(vectors), dtype=np.int64)
        hnsw = FaissVectorIndex().load(FaissVectorIndex().build(SegmentVectors(ids, vectors), IndexSpec(HNSW)))
        build_s = time.perf_counter() - started
        faiss.omp_set_num_threads(1)
        results["hnsw, 1 thread"] = _p50(lambda q: hnsw.search(q[None], K), queries)
        _, exact = flat.search(queries, K)
        approximate = [hnsw.search(query[None], K)[1] for query in queries]
        results["hnsw recall@10"] = float(np.mean([len(set(a) & set(e)) / K for a, e in zip(approximate, exact)]))
        results["hnsw build s"] = build_s
    faiss.omp_set_num_threads(2)
    return results


def _compare_formats(vectors: np.ndarray, skip: list[str]) -> list[dict]:
    """Each candidate segment format on the same vectors: build time, bytes per vector (serialized),
    recall@10 against exact search, one-thread query p50/p99, and a memory-mapped reload's time and RSS."""
    import faiss
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.segments import IVF_SQ8, SegmentVectors, ivf_spec

    rng = np.random.default_rng(7)
    queries = vectors[rng.integers(0, len(vectors), 200)] + 0.05 * rng.standard_normal((200, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    faiss.omp_set_num_threads(2)
    _, truth = exact.search(queries, K)
    del exact
    ids = np.arange(len(vectors), dtype=np.int64)
    lists = ivf_spec(len(vectors)).lists
    candidates = {
        "flat": ("Flat", {}),
        "fp16": ("SQfp16", {}),
        "sq8": ("SQ8", {}),
        "ivf_pq64+rflat": (f"IVF{lists},PQ64x8,RFlat", {"nprobe": 64, "k_factor": 8}),
        "ivf_pq64+rsq8": (f"IVF{lists},PQ64x8,Refine(SQ8)", {"nprobe": 64, "k_factor": 8}),
        "hnsw32_sq8": ("HNSW32_SQ8", {"efSearch": 256}),
    }
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="formats-"))
    for name, (factory, params) in candidates.items():
        if name in skip:
            continue
        started = time.perf_counter()
        faiss.omp_set_num_threads(2)
        inner = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
        if "HNSW" in factory:
            faiss.downcast_index(inner).hnsw.efConstruction = 80
        if not inner.is_trained:
            inner.train(vectors[rng.choice(len(vectors), min(len(vectors), lists * 256), replace=False)])
        index = faiss.IndexIDMap2(inner)
        index.add_with_ids(vectors, ids)
        build_s = time.perf_counter() - started
        _set_search_parameters(faiss.downcast_index(index.index), params)
        rows.append(_measure_format(name, index, build_s, queries, truth, scratch))
        del index, inner
        _log(f"format {name}: {rows[-1]}")
    if IVF_SQ8 not in skip:
        spec = ivf_spec(len(vectors))
        started = time.perf_counter()
        path = scratch / "ivf_sq8.faiss"
        faiss.omp_set_num_threads(2)
        FaissVectorIndex().write(SegmentVectors(ids, vectors), spec, path)
        build_s = time.perf_counter() - started
        index = faiss.read_index(str(path))
        for probes in sorted({spec.probes, 32, 128}):
            faiss.downcast_index(index.index).nprobe = probes
            shipped = ", shipped" if probes == spec.probes else ""
            rows.append(_measure_format(f"ivf{spec.lists}_sq8 nprobe {probes}{shipped}", index, build_s, queries,
                                        truth, scratch))
            _log(f"format ivf_sq8/{probes}: {rows[-1]}")
        del index
    return rows


def _set_search_parameters(index, params: dict) -> None:
    import faiss

    if "k_factor" in params:
        index.k_factor = params["k_factor"]
        index = faiss.downcast_index(index.base_index)
    if "nprobe" in params:
        index.nprobe = params["nprobe"]
    if "efSearch" in params:
        index.hnsw.efSearch = params["efSearch"]


def _measure_format(name, index, build_s, queries, truth, scratch: Path) -> dict:
    import faiss

    path = scratch / "segment.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    faiss.omp_set_num_threads(1)
    found = np.vstack([index.search(query[None], K)[1] for query in queries])
    recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
    durations = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None], K)
        durations.append((time.perf_counter() - started) * 1000)
    faiss.omp_set_num_threads(2)
    load = _mmap_reload(path)
    path.unlink()
    return {"format": name, "build_s": build_s, "bytes_per_vector": size / index.ntotal, "recall@10": recall,
            "p50_ms": float(np.percentile(durations, 50)), "p99_ms": float(np.percentile(durations, 99)), **load}


def _mmap_reload(path: Path) -> dict:
    """Opens the file memory-mapped in a fresh process, runs 200 queries: open time and RSS growth."""
    script = (
        "import faiss, numpy as np, time, json, sys\n"
        "def rss():\n"
        "    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 1024\n"
        "before = rss(); t = time.perf_counter()\n"
        "index = faiss.read_index(sys.argv[1], faiss.IO_FLAG_MMAP_IFC)\n"
        "opened = time.perf_counter() - t\n"
        "faiss.omp_set_num_threads(1)\n"
        "q = np.random.default_rng(0).standard_normal((200, index.d)).astype('float32')\n"
        "[index.search(v[None], 10) for v in q]\n"
        "print(json.dumps({'mmap_open_ms': opened * 1000, 'rss_growth_mb': rss() - before}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _print_formats(size: int, rows: list[dict]) -> None:
    print(f"\n== segment formats at {size:,} clustered 512-d vectors (k=10, one thread per query) ==")
    print("| format | build s | bytes/vector | recall@10 | p50 ms | p99 ms | mmap open ms | RSS after 200 queries MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['format']} | {row['build_s']:.1f} | {row['bytes_per_vector']:.0f} | {row['recall@10']:.3f} | "
              f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['mmap_open_ms']:.0f} | {row['rss_growth_mb']:.0f} |")
    sys.stdout.flush()


def _p50(search, queries: np.ndarray) -> float:
    search(queries[0])
    durations = []
    for query in queries:
        started = time.perf_counter()
        search(query)
        durations.append(time.perf_counter() - started)
    return statistics.median(durations) * 1000


# --- child processes ---------------------------------------------------------------------------------


def _run_child(kind: str, environment: dict, dataset: str, args, scratch: Path, index_file: Path | None = None) -> dict:
    # BENCH_CHILD_PREFIX runs each child under a tool, e.g. "py-spy record --gil --format raw -o FILE --".
    command = shlex.split(os.environ.get("BENCH_CHILD_PREFIX", "")) + [
        sys.executable, str(Path(__file__).resolve()), "--child", kind, "--dataset", dataset,
        "--queries", str(args.queries if kind == "service" else args.baseline_queries),
        "--image-queries", str(args.image_queries if kind == "service" else args.baseline_image_queries),
        "--model", str(args.model),
    ] + (["--verbose"] if args.verbose else []) + (["--profile"] if args.profile else []) + (
        ["--skip-warm"] if args.skip_warm else [])
    if index_file:
        command += ["--index-file", str(index_file)]
    child_environment = {
        **os.environ, **environment,
        "CLIPSEARCH_MODEL_CACHE_DIR": str(scratch / f"model-cache-{uuid.uuid4().hex[:8]}"),  # cold: fetch again
        "BENCH_SPAWNED_AT": repr(time.time()),
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008",  # the template's, so the snapshot budget is the deployed one
        "CLIPSEARCH_SEGMENT_DIR": str(scratch / f"segments-{uuid.uuid4().hex[:8]}"),
    }
    _log(f"{dataset}: running {kind}")
    completed = subprocess.run(
        command, env=child_environment, capture_output=True, text=True, cwd=REPO, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{completed.stderr[-4000:]}")
    if args.verbose:
        print(completed.stderr, file=sys.stderr)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _child(args) -> int:
    spawned_at = float(os.environ["BENCH_SPAWNED_AT"])
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    query_images = _query_images(args.image_queries)
    steps: dict[str, tuple[float, float]] = {}
    if args.child == "service":
        _time_cold_start_steps(steps, spawned_at)
        steps["interpreter and harness started"] = (0.0, time.time() - spawned_at)
        text, image, function = _service_searchers(args.dataset)
        steps["handler module imported"] = (0.0, time.time() - spawned_at)
    else:
        text, image = _baseline_searchers(
            args.dataset, Path(args.index_file), os.environ["CLIPSEARCH_DATABASE_URL"], args.model
        )
        function = None
    first_hits = text(TEXT_QUERIES[0])
    if first_hits != K:
        raise RuntimeError(f"the first query found {first_hits} hits, not {K}")
    cold_start_s = time.time() - spawned_at
    cold_start_cpu_s = time.process_time()  # every thread of this process since it started
    whole_segments_s = None
    if args.child == "service":
        # Segments opened in part are downloaded whole in the background after the first answer: the warm
        # figures below are the whole segments', so wait for them (a no-op when they were loaded whole).
        from clipsearch.wiring import get_search_service

        if not get_search_service().wait_for_segments(timeout=300):
            raise RuntimeError("the whole segments were still loading after 300 s")
        whole_segments_s = time.time() - spawned_at
    if args.skip_warm:
        print(json.dumps({"cold_start_s": cold_start_s, "cold_start_cpu_s": cold_start_cpu_s,
                          "whole_segments_s": whole_segments_s, "first_hits": first_hits,
                          "peak_rss_mb": peak_rss_mib(), "cold_start_steps": steps}))
        return 0
    started = time.perf_counter()
    image(query_images[0])
    first_image_s = time.perf_counter() - started
    cpu_before = time.process_time()
    pauses: list[tuple[int, float]] = []  # (generation, ms) of each collection during the new-text run
    collecting: dict[str, float] = {}

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start":
            collecting["at"] = time.perf_counter()
        elif "at" in collecting:
            pauses.append((info["generation"], (time.perf_counter() - collecting.pop("at")) * 1000))

    gc.callbacks.append(on_collection)
    threads_before, steal_before = _thread_cpu_ms(), _stolen_ms()
    query_costs: list[tuple[float, int, int]] = []
    text_ms = _latencies(text, [_new_text(i) for i in range(args.queries)], query_costs)  # each text new: embedded
    threads_after, steal_after = _thread_cpu_ms(), _stolen_ms()
    gc.callbacks.remove(on_collection)
    text_cpu_ms = (time.process_time() - cpu_before) * 1000 / args.queries
    cpu_before = time.process_time()
    repeated_ms = _latencies(text, [TEXT_QUERIES[i % len(TEXT_QUERIES)] for i in range(args.queries)])
    repeated_cpu_ms = (time.process_time() - cpu_before) * 1000 / args.queries
    image_ms = _latencies(image, [query_images[i % len(query_images)] for i in range(args.image_queries)])
    peak_rss_mb = peak_rss_mib()
    parts = _warm_text_parts(args.dataset, args.queries) if args.child == "service" else {}
    stages = {}
    if args.child == "service":
        stages = _warm_text_stages(function, text, args.queries, first=3 * args.queries)
    profile = cpu_profile = {}
    if args.profile and args.child == "service":
        profile = _profile_warm_text(text, args.queries // 2, first=args.queries)
        cpu_profile = _profile_warm_text(text, args.queries // 2, time.thread_time, first=2 * args.queries)
    print(json.dumps({
        "cold_start_s": cold_start_s,
        "cold_start_cpu_s": cold_start_cpu_s,
        "text_cpu_ms": text_cpu_ms,
        "repeated_text_cpu_ms": repeated_cpu_ms,
        "first_image_query_s": first_image_s,
        "first_hits": first_hits,
        "text_p50_ms": float(np.percentile(text_ms, 50)),
        "text_p99_ms": float(np.percentile(text_ms, 99)),
        "text_slowest": [(int(i), float(text_ms[i]), *query_costs[i]) for i in np.argsort(text_ms)[::-1][:5]],
        "text_run_faults": {"major": sum(cost[1] for cost in query_costs),
                            "minor": sum(cost[2] for cost in query_costs)},
        "text_run_queries_with_steal": sum(1 for cost in query_costs if cost[0] > 0),
        "text_run_stolen_ms": steal_after - steal_before,
        "text_run_threads": sorted(((threads_after[name] - threads_before.get(name, 0.0), name)
                                    for name in threads_after), reverse=True)[:8],
        "text_run_collections": {str(generation): [sum(1 for g, _ in pauses if g == generation),
                                                  max((ms for g, ms in pauses if g == generation), default=0.0)]
                                 for generation in (0, 1, 2)},
        "repeated_text_p50_ms": float(np.percentile(repeated_ms, 50)),
        "repeated_text_p99_ms": float(np.percentile(repeated_ms, 99)),
        "image_p50_ms": float(np.percentile(image_ms, 50)),
        "image_p99_ms": float(np.percentile(image_ms, 99)),
        "peak_rss_mb": peak_rss_mb,
        "parts": parts,
        "stages": stages,
        "profile": profile,
        "cpu_profile": cpu_profile,
        "cold_start_steps": steps,
        "whole_segments_s": whole_segments_s,
    }))
    return 0


def _time_cold_start_steps(steps: dict[str, tuple[float, float]], spawned_at: float) -> None:
    """Records when each step of the cold start ran (first call, seconds since the process was spawned)
    by wrapping the adapters' methods in this child process only, each as its module is first imported:
    importing them here first would change the order the function imports them in, and with it what its
    init overlaps."""

    spans = threading.Lock()

    def timed(owner, name: str, label, every_call: bool = False) -> None:
        """`every_call`: the step spans the first call's start to the last call's end (calls on many threads)."""
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                step, ended = label(*args), time.time()
                with spans:
                    first_start, last_end = steps.get(step, (started - spawned_at, 0.0))
                    if every_call or step not in steps:
                        steps[step] = (min(first_start, started - spawned_at), max(last_end, ended - spawned_at))

        setattr(owner, name, wrapper)

    def s3_store(module) -> None:
        timed(module.S3ObjectStore, "download_file", lambda store, key, destination:
              "segment download" if key.startswith("indexes/") else f"model file {key}")
        timed(module.S3ObjectStore, "get", lambda store, key: f"model file {key}")
        timed(module.S3ObjectStore, "get_range", lambda store, key, *_: "first ranged GET of a segment")

    def faiss_index(module) -> None:
        timed(module.FaissVectorIndex, "open", lambda *_: "segment open (mmap)")
        timed(module.FaissVectorIndex, "open_partial", lambda *_: "segment opened in part (header, id map)")
        timed(module.PartialFaissSegment, "search", lambda *_: "segment searched in part (probed lists fetched)")
        timed(module.FaissVectorIndex, "open_partial", lambda *_: "every segment opened in part", every_call=True)
        timed(module.PartialFaissSegment, "search", lambda *_: "every segment searched in part", every_call=True)

    def postgres_catalog(module) -> None:
        timed(module.PostgresCatalog, "get_dataset", lambda *_: "catalog: dataset row")
        timed(module.PostgresCatalog, "live_segments", lambda *_: "catalog: live segments")
        timed(module.PostgresCatalog, "image_locations", lambda *_: "catalog: paths of the hits")

    def model_files(module) -> None:
        timed(module.ModelFiles, "verify", lambda files, paths=None: f"model files checked ({', '.join(paths or [])})")
        timed(module.ModelFiles, "tokenizer", lambda *_: "tokenizer loaded")

    def encoders(module) -> None:
        imported(module)
        timed(module, "create_session", lambda graph, *_: f"onnx session {Path(graph).parent.name}")

    def imported(module) -> None:  # when a module's import ended, as a step of no length
        at = time.time() - spawned_at
        steps.setdefault(f"{module.__name__} imported", (at, at))

    sys.meta_path.insert(0, _PatchOnImport({
        "clipsearch.adapters.s3_store": s3_store,
        "clipsearch.adapters.postgres_catalog": postgres_catalog,
        "clipsearch.adapters.faiss_index": faiss_index,
        "clipsearch.model_files": model_files,
        "clipsearch.search": lambda module: timed(
            module.SearchService, "_load_whole", lambda *_: "whole segments downloaded, opened, swapped in (background)"),
        "clipsearch.encoders": encoders,
        "clipsearch.http.routes": imported,
        "onnxruntime": imported,
    }))


class _PatchOnImport:
    """A meta path finder that runs `patches[name](module)` right after module `name` is first executed."""

    def __init__(self, patches: dict) -> None:
        self._patches = dict(patches)

    def find_spec(self, name, path, target=None):
        patch = self._patches.pop(name, None)
        if patch is None:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _service_searchers(dataset: str):
    """The real function: its module imported fresh, called with HTTP API v2 events."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("search_app", REPO / "functions" / "search" / "app.py")
    function = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(function)
    context = types.SimpleNamespace(  # what Powertools reads from Lambda's context
        function_name="search", function_version="$LATEST", memory_limit_in_mb=3008,
        invoked_function_arn="arn:aws:lambda:us-east-1:000000000000:function:search", aws_request_id="bench",
    )

    def call(path: str, body: str, content_type: str, encoded: bool) -> int:
        event = {
            "version": "2.0", "routeKey": f"POST {path}", "rawPath": path, "rawQueryString": f"k={K}",
            "queryStringParameters": {"k": str(K)},
            "headers": {"content-type": content_type}, "isBase64Encoded": encoded, "body": body,
            "requestContext": {"http": {"method": "POST", "path": path}, "stage": "$default"},
        }
        response = function.handler(event, context)
        if response["statusCode"] != 200:
            raise RuntimeError(f"search failed: {response}")
        return len(json.loads(response["body"])["results"])

    def text(query: str) -> int:
        return call(f"/datasets/{dataset}/search/text", json.dumps({"query": query, "k": K}), "application/json", False)

    def image(data: bytes) -> int:
        return call(f"/datasets/{dataset}/search/image", base64.b64encode(data).decode(), "image/jpeg", True)

    return text, image, function


def _baseline_searchers(dataset: str, index_file: Path, database_url: str, model_dir: Path):
    """Per query: PyTorch encode, read the FAISS file, new database connection (the original project)."""
    import faiss
    import psycopg
    import torch
    from clipsearch.images import ImagePreprocessor
    from clipsearch.model_files import ModelFiles

    from model_export.checkpoint import build_random_checkpoint

    clip = build_random_checkpoint("vit-b-32", 0).model.eval()
    files = ModelFiles.open(model_dir)  # the same tokenizer and preprocessing as ours
    tokenizer, preprocessor = files.tokenizer(), ImagePreprocessor(files.preprocess())

    def lookup(vector: np.ndarray) -> int:
        index = faiss.read_index(str(index_file))
        _, ids = index.search(vector[None].astype(np.float32), K)
        with psycopg.connect(database_url) as connection:
            rows = connection.execute(
                "SELECT id, object_key, source_path FROM images WHERE id = ANY(%s)", ([int(i) for i in ids[0]],)
            ).fetchall()
        return len(rows)

    def text(query: str) -> int:
        with torch.no_grad():
            ids = torch.from_numpy(tokenizer.encode(query).ids[None].astype(np.int64))
            vector = clip.get_text_features(input_ids=ids)[0].numpy()
        return lookup(vector / np.linalg.norm(vector))

    def image(data: bytes) -> int:
        with torch.no_grad():
            pixels = torch.from_numpy(preprocessor.prepare(data, "query").pixel_values[None])
            vector = clip.get_image_features(pixel_values=pixels)[0].numpy()
        return lookup(vector / np.linalg.norm(vector))

    return text, image


# The stages of a warm text query, by the function or method that runs each (nested calls are subtracted
# from their caller, so every stage is its own time): (owner module, owner attribute, method, stage).
_STAGES = (
    (None, None, "handler", "telemetry wrappers (logging, metrics, tracer)"),
    ("aws_lambda_powertools.event_handler", "APIGatewayHttpResolver", "resolve",
     "HTTP routing, validation, response JSON"),
    ("clipsearch.search", "SearchService", "search_text", "search service, other"),
    ("clipsearch.tokenizer", "ClipTokenizer", "encode", "tokenizer"),
    ("clipsearch.encoders", "OnnxTextEncoder", "_run", "text tower (onnxruntime)"),
    ("clipsearch.adapters.postgres_catalog", "PostgresCatalog", "get_dataset", "catalog: dataset row"),
    ("clipsearch.adapters.faiss_index", "FaissSegment", "search", "FAISS search"),
    ("clipsearch.adapters.postgres_catalog", "PostgresCatalog", "image_locations", "catalog: paths of the hits"),
)


def _warm_text_stages(function, text, count: int, first: int) -> dict:
    """Where a new warm text query's time goes, stage by stage, through the handler: each stage's own wall
    time and process CPU time (every thread's: the text tower's pool included), median over `count`
    queries, and the handler's total. Measured after the timed runs, with the stages wrapped. Each thread
    subtracts only its own nested stages: a stage on a query thread (the dataset row, a share of the FAISS
    segments) overlaps the request thread's, so the stages add up to more than the handler's wall."""
    import importlib
    import threading

    stacks = threading.local()  # .frames: [wall started, cpu started, wall of callees, cpu of callees], per thread
    query: dict[str, list[float]] = {}
    handler_total: list[float] = [0.0, 0.0]
    handler_label = _STAGES[0][3]
    adding = threading.Lock()

    def wrapped(label: str, original):
        def timed(*args, **kwargs):
            if not hasattr(stacks, "frames"):
                stacks.frames = []
            frames = stacks.frames
            frames.append([time.perf_counter(), time.process_time(), 0.0, 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                started, cpu_started, callees, callee_cpu = frames.pop()
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                with adding:
                    own = query.setdefault(label, [0.0, 0.0])
                    own[0] += wall - callees
                    own[1] += cpu - callee_cpu
                    if label == handler_label:
                        handler_total[:] = [wall, cpu]
                if frames:
                    frames[-1][2] += wall
                    frames[-1][3] += cpu
        return timed

    originals = []
    for module, owner_name, method, label in _STAGES:
        owner = function if module is None else getattr(importlib.import_module(module), owner_name)
        originals.append((owner, method, getattr(owner, method)))
        setattr(owner, method, wrapped(label, getattr(owner, method)))
    per_stage: dict[str, tuple[list[float], list[float]]] = {label: ([], []) for *_, label in _STAGES}
    totals: tuple[list[float], list[float]] = ([], [])
    collections = _CollectorPauses()
    try:
        collections.start()
        for number in range(count):
            query.clear()
            collections.next_query()
            text(_new_text(first + number))
            for label, (walls, cpus) in per_stage.items():
                wall, cpu = query.get(label, (0.0, 0.0))
                walls.append(wall * 1000)
                cpus.append(cpu * 1000)
            totals[0].append(handler_total[0] * 1000)
            totals[1].append(handler_total[1] * 1000)
    finally:
        collections.stop()
        for owner, method, original in originals:
            setattr(owner, method, original)
    slowest = sorted(range(count), key=lambda number: -totals[0][number])[:_SLOWEST_SHOWN]
    return {
        "stages_ms": {
            label: (float(np.median(walls)), float(np.median(cpus))) for label, (walls, cpus) in per_stage.items()
        },
        "handler_ms": (float(np.median(totals[0])), float(np.median(totals[1]))),
        # The tail: the slowest queries' stages and the collector's pauses inside each, to tell what made them slow.
        "slowest": [
            {"handler_ms": (totals[0][number], totals[1][number]),
             "stages_ms": {label: (walls[number], cpus[number]) for label, (walls, cpus) in per_stage.items()},
             "gc_ms": collections.per_query[number]}
            for number in slowest
        ],
        "gc": collections.summary(count),
    }


_SLOWEST_SHOWN = 4


class _CollectorPauses:
    """The garbage collector's pauses while queries run: per query, the ms spent in each generation's collections."""

    def __init__(self) -> None:
        self.per_query: list[dict[int, float]] = []
        self._started: float | None = None
        self._pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def start(self) -> None:
        gc.callbacks.append(self._heard)

    def stop(self) -> None:
        gc.callbacks.remove(self._heard)

    def next_query(self) -> None:
        self.per_query.append({})

    def _heard(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None and self.per_query:
            pause = (time.perf_counter() - self._started) * 1000
            generation = info["generation"]
            self._pauses[generation].append(pause)
            self.per_query[-1][generation] = self.per_query[-1].get(generation, 0.0) + pause
            self._started = None

    def summary(self, count: int) -> dict[str, tuple[int, float, float]]:
        """Per generation: collections per 100 queries, median and longest pause (ms)."""
        return {
            f"generation {generation}": (len(pauses) * 100 / count, float(np.median(pauses)) if pauses else 0.0,
                                         max(pauses, default=0.0))
            for generation, pauses in self._pauses.items()
        }


def _warm_text_parts(dataset: str, count: int) -> dict[str, float]:
    """Where a warm text query's time goes, timed alone: the two catalog reads (on ids of the dataset), and
    the text tower with 1 and 2 threads, spin-waiting off (as the function runs it) and on, in interleaved
    rounds of new texts so that the machine's load falls on every variant alike."""
    from clipsearch.adapters.postgres_catalog import PostgresCatalog
    from clipsearch.config import Settings
    from clipsearch.encoders import TEXT_INPUT, TEXT_OUTPUT, create_session
    from clipsearch.model_files import TEXT_GRAPH, ModelFiles
    from clipsearch.wiring import build_database

    settings = Settings.from_env()
    files = ModelFiles.open(settings.model_cache_dir / settings.model_id)
    database = build_database(settings)
    catalog = PostgresCatalog(database)
    with database.read() as connection:
        ids = [row["id"] for row in connection.execute(
            "SELECT id FROM images WHERE dataset_id = (SELECT id FROM datasets WHERE name = %s) LIMIT 10", (dataset,)
        )]
    parts = {
        "dataset row p50 ms": float(np.percentile(_latencies(catalog.get_dataset, [dataset] * count), 50)),
        "paths of 10 ids p50 ms": float(np.percentile(_latencies(catalog.image_locations, [ids] * count), 50)),
    }
    tokenizer = files.tokenizer()
    token_ids = [tokenizer.encode(_new_text(number)).ids[np.newaxis, :] for number in range(count)]
    # Spin modes: workers asleep between operators, spinning unbounded, or (the function's setting) spinning at
    # most `settings.text_spin_microseconds` and stopped when a run ends.
    spin_modes = {"off": {}, "on": {"spinning": True},
                  f"{settings.text_spin_microseconds} us, stopped after each run": {
                      "spin_microseconds": settings.text_spin_microseconds}}
    sessions = {
        (threads, mode): create_session(files.directory / TEXT_GRAPH, threads, **options)
        for threads in (1, 2) for mode, options in spin_modes.items()
        if threads > 1 or mode == "off"
    }
    timings: dict[tuple[int, str], list[float]] = {variant: [] for variant in sessions}
    for session in sessions.values():
        session.run([TEXT_OUTPUT], {TEXT_INPUT: token_ids[0]})
    for start in range(0, count, 10):
        for variant, session in sessions.items():
            for ids in token_ids[start:start + 10]:
                started = time.perf_counter()
                session.run([TEXT_OUTPUT], {TEXT_INPUT: ids})
                timings[variant].append((time.perf_counter() - started) * 1000)
    function_threads = settings.onnx_threads or 1  # as clipsearch.wiring builds the text tower
    function_mode = "off" if function_threads == 1 or not settings.text_spin_microseconds else list(spin_modes)[2]
    for (threads, mode), durations in timings.items():
        used = " (the function's)" if (threads, mode) == (function_threads, function_mode) else ""
        label = f"text tower, {threads} thread{'s' if threads > 1 else ''}, spinning {mode}"
        parts[f"{label}{used} p50 ms"] = float(np.percentile(durations, 50))
    return parts


# Where a profiled function's own time goes: the first pattern found in its file or name names its area.
_PROFILE_AREAS = (
    ("onnxruntime", "text tower (onnxruntime)"),
    ("tokenizers", "tokenizer"), ("clipsearch/tokenizer", "tokenizer"), ("ftfy", "tokenizer"),
    ("faiss", "FAISS"),
    ("psycopg", "catalog (psycopg)"), ("postgres_catalog", "catalog (psycopg)"),
    ("select.", "catalog (psycopg)"), ("socket", "catalog (psycopg)"),
    ("event_handler/openapi", "powertools validation"), ("pydantic", "pydantic"),
    ("event_handler", "powertools resolver"),
    ("powertools/logging", "logging"), ("logging/", "logging"), ("powertools/metrics", "metrics"),
    ("powertools/tracing", "tracing"), ("aws_xray_sdk", "tracing"),
    ("aws_lambda_powertools", "powertools (other)"),
    ("json", "json"), ("clipsearch/", "clipsearch"), ("numpy", "numpy"),
)


def _profile_warm_text(text, count: int, clock=time.perf_counter, first: int = 0) -> dict:
    """cProfile over `count` warm text queries through the handler: each area's own time per query (ms)
    and the functions with the most own time, by `clock` (wall time, or the thread's CPU time: waits for
    PostgreSQL then cost nothing). Profiling slows Python code more than C calls, so the shares are for
    finding costs; the timed figures are the ones to report."""
    import cProfile
    import pstats

    queries = [_new_text(first + i) for i in range(count)]  # not seen before: the uncached path
    profiler = cProfile.Profile(clock)
    profiler.enable()
    for query in queries:
        text(query)
    profiler.disable()
    if os.environ.get("BENCH_PROFILE_OUT"):  # for pstats / snakeviz
        profiler.dump_stats(os.environ["BENCH_PROFILE_OUT"])
    stats = pstats.Stats(profiler).stats
    areas: dict[str, float] = {}
    for (file, _, name), (_, _, own, _, _) in stats.items():
        where = f"{file} {name}"
        area = next((label for pattern, label in _PROFILE_AREAS if pattern in where), "other")
        areas[area] = areas.get(area, 0.0) + own * 1000 / count
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:25]
    return {
        "areas_ms_per_query": dict(sorted(areas.items(), key=lambda item: -item[1])),
        "top_own_ms_per_query": [
            (f"{Path(file).name}:{line} {name}", round(own * 1000 / count, 4), calls // count)
            for (file, line, name), (_, calls, own, _, _) in top
        ],
    }


def _new_text(number: int) -> str:
    """A query text not asked before in this process (one of TEXT_QUERIES and a number: 1-2 more tokens)."""
    return f"{TEXT_QUERIES[number % len(TEXT_QUERIES)]} {number}"


def _thread_cpu_ms() -> dict[str, float]:
    """CPU ms of each of this process's threads: Python's by name, the others (onnxruntime, OpenMP) by id."""
    import threading

    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    times = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(task.name), f"native {task.name}")
        times[name] = times.get(name, 0.0) + (int(fields[11]) + int(fields[12])) * tick_ms
    return times


def _stolen_ms() -> float:
    """CPU time taken from this VM's CPUs by the hypervisor since boot (the steal column of /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")


def _latencies(search, queries: list, query_costs: list | None = None) -> np.ndarray:
    """Each query's wall ms; with `query_costs`, also what each query met meanwhile: (ms stolen by the hypervisor
    from this VM, both CPUs, counted in 10 ms ticks; major and minor page faults of this process)."""
    durations = []
    for query in queries:
        if query_costs is not None:
            stolen, usage = _stolen_ms(), resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        search(query)
        durations.append((time.perf_counter() - started) * 1000)
        if query_costs is not None:
            after = resource.getrusage(resource.RUSAGE_SELF)
            query_costs.append((_stolen_ms() - stolen, after.ru_majflt - usage.ru_majflt,
                              after.ru_minflt - usage.ru_minflt))
    return np.array(durations)


def _query_images(count: int) -> list[bytes]:
    photos = sorted((SEED_EVAL / "val").glob("*.jp*g"))[: max(count, 1)]
    if photos:
        return [photo.read_bytes() for photo in photos]
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(8):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    return images


# --- services and setup ------------------------------------------------------------------------------


@contextmanager
def _services(store: str = "moto"):
    """A PostgreSQL cluster and an S3 endpoint: moto in this process, or SeaweedFS (`weed mini`, the local
    stack's object store) in its own. moto serves a GET from Python in the harness's process, ~10 s of CPU
    per GB on these 2 cores, which the measured function then competes with: cold starts are measured
    against SeaweedFS."""
    from clipsearch_tools.local.postgres import start_cluster

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchsecret")
    with tempfile.TemporaryDirectory(prefix="search-bench-services-") as services_dir, \
            _object_store(store, Path(services_dir)) as endpoint:
        cluster = start_cluster(Path(services_dir) / "pg")
        try:
            yield endpoint, cluster.url
        finally:
            cluster.stop()


@contextmanager
def _object_store(store: str, directory: Path):
    if store == "seaweed":
        from clipsearch.aws import aws_client
        from clipsearch_tools.local.seaweed import SeaweedServer

        server = SeaweedServer(data_dir=directory / "weed", log_file=directory / "weed.log",
                               access_key=os.environ["AWS_ACCESS_KEY_ID"],
                               secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])
        server.start(lambda url: aws_client("s3", "us-east-1", url))
        try:
            yield server.s3_url
        finally:
            server.process.terminate()
            server.process.wait(30)
        return
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request access log
    _read_moto_objects_once()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _read_moto_objects_once() -> None:
    """moto 5.2.5 reads an object's whole body from its spooled file, under a lock, for every GET, ranged or
    not, then slices the range: a segment fetched as 9 ranged GETs would cost 9 full reads, which S3 does
    not. Here each object's bytes are read once and kept (the harness's memory, not the function's), so a
    ranged GET costs its range, as in S3."""
    from moto.s3.models import FakeKey

    stored = FakeKey.value

    def read_once(key) -> bytes:
        body = getattr(key, "_bench_body", None)
        if body is None:
            body = key._bench_body = stored.fget(key)
        return body

    def write(key, value: bytes) -> None:
        key._bench_body = None
        stored.fset(key, value)

    FakeKey.value = property(read_once, write)


def _environment(endpoint: str, database_url: str, model_dir: Path, scratch: Path) -> dict[str, str]:
    return {
        "CLIPSEARCH_BUCKET": "clipsearch-bench",
        "CLIPSEARCH_MODEL_ID": _model_id(model_dir),
        "CLIPSEARCH_DATABASE_URL": database_url,
        "CLIPSEARCH_S3_ENDPOINT_URL": endpoint,
        "CLIPSEARCH_MODEL_CACHE_DIR": str(scratch / "model-cache"),
        # template.yaml's SearchFunction setting (its 3008 MB hold ~2 vCPUs); unset, the text tower runs on one thread
        "CLIPSEARCH_ONNX_THREADS": os.environ.get("CLIPSEARCH_ONNX_THREADS", "2"),
        **{name: os.environ[name] for name in ("CLIPSEARCH_TEXT_SPIN_MICROSECONDS",) if name in os.environ},
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
    }


def _store(environment: dict[str, str]):
    from clipsearch.config import Settings
    from clipsearch.wiring import build_object_store, service_client

    settings = Settings.from_env(environment)
    service_client("s3", settings).create_bucket(Bucket=settings.bucket)
    return build_object_store(settings)


def _upload_model(store, model_dir: Path, model_id: str) -> None:
    from clipsearch.datasets import model_prefix

    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            store.put(model_prefix(model_id) + path.relative_to(model_dir).as_posix(), path.read_bytes())


def _model_dir(model: Path) -> Path:
    if not (model / "manifest.json").exists():
        _log(f"exporting {model} (int8 random ViT-B/32, seed 0)")
        subprocess.run(
            [sys.executable, "-m", "model_export", "--random-arch", "vit-b-32", "--seed", "0",
             "--quantize", "int8", "--out", str(model)],
            check=True, cwd=REPO,
        )
    return model


def _model_id(model_dir: Path) -> str:
    return json.loads((model_dir / "manifest.json").read_text())["model_id"]


# --- output ------------------------------------------------------------------------------------------


def _print_size(row: dict) -> None:
    ours, baseline = row["ours"], row["baseline"]
    print(f"\n== {row['size']:,} vectors ({row['index_type']} segment) ==")
    print(f"{'':26}{'ours':>12}{'baseline':>12}{'speed-up':>10}")
    for label, key, unit in (
        ("warm text p50", "text_p50_ms", "ms"), ("warm text p99", "text_p99_ms", "ms"),
        ("warm repeated text p50", "repeated_text_p50_ms", "ms"), ("warm repeated text p99", "repeated_text_p99_ms", "ms"),
        ("warm image p50", "image_p50_ms", "ms"), ("warm image p99", "image_p99_ms", "ms"),
        ("cold start (text)", "cold_start_s", "s"), ("cold start, CPU", "cold_start_cpu_s", "s"),
        ("warm text, CPU per query", "text_cpu_ms", "ms"), ("repeated text, CPU per query", "repeated_text_cpu_ms", "ms"), ("first image query", "first_image_query_s", "s"),
        ("peak RSS", "peak_rss_mb", "MB"),
    ):
        if key not in ours:  # --skip-warm
            continue
        if baseline is None or key not in baseline:
            print(f"{label + ' (' + unit + ')':26}{ours[key]:12.2f}{'-':>12}{'-':>10}")
            continue
        ratio = baseline[key] / ours[key] if ours[key] else float("nan")
        print(f"{label + ' (' + unit + ')':26}{ours[key]:12.2f}{baseline[key]:12.2f}{ratio:9.1f}x")
    print(f"recall@10 vs exact search (the segment as the function opens it): {row['recall']:.4f}")
    print(f"harness writes (catalog rows, uploads) flushed to disk before the search process started: "
          f"{row.get('harness_writes_flushed', '-')}")
    print(f"catalog statistics when the search process started: {row.get('catalog_statistics', '-')}")
    print(f"autovacuum runs while the search process ran (they compete with it for the cores): "
          f"{ours.get('catalog_maintenance', '-')}")
    for name, value in row.get("search_threads", {}).items():
        print(f"  {name:56}{value:10.3f}")
    if ours.get("whole_segments_s") is not None:
        print(f"first answer {ours['cold_start_s']:.2f} s; every segment loaded whole {ours['whole_segments_s']:.2f} s "
              f"after the spawn")
    if ours.get("text_run_threads"):
        print("CPU ms per thread during the new-text run: "
              + ", ".join(f"{name} {ms:.0f}" for ms, name in ours["text_run_threads"])
              + f"; CPU time the hypervisor gave to others meanwhile (steal): {ours['text_run_stolen_ms']:.0f} ms")
    if ours.get("text_slowest"):
        print("slowest new-text queries (their order in the run, ms; the VM's stolen ms in 10 ms ticks, this process's "
              "major/minor page faults meanwhile): "
              + ", ".join(f"#{number} {ms:.1f} ({stolen:.0f}, {major}/{minor})"
                          for number, ms, stolen, major, minor in ours["text_slowest"])
              + f"; in the whole run {ours['text_run_faults']['major']} major / {ours['text_run_faults']['minor']} minor"
              + f" faults, {ours['text_run_queries_with_steal']} queries during which a steal tick was counted"
              + "; garbage collections in that run (generation: count, longest ms): "
              + ", ".join(f"{generation}: {count}, {longest:.1f}"
                          for generation, (count, longest) in ours.get("text_run_collections", {}).items()))
    print("cold start steps (s since the process was spawned: start -> end; first call of each; 'every ...':"
          " the first call's start to the last one's end):")
    for name, (start, end) in sorted(ours.get("cold_start_steps", {}).items(), key=lambda item: item[1]):
        print(f"  {start:6.2f} -> {end:6.2f}  ({end - start:5.2f} s)  {name}")
    if ours.get("stages"):
        handler_wall, handler_cpu = ours["stages"]["handler_ms"]
        print(f"stages of a new warm text query through the handler (median of each stage's own time, ms; CPU = "
              f"process CPU, every thread; handler total p50 {handler_wall:.2f} ms wall, {handler_cpu:.2f} ms CPU):")
        print(f"  {'stage':46}{'wall':>8}{'CPU':>8}")
        for name, (wall, cpu) in ours["stages"]["stages_ms"].items():
            print(f"  {name:46}{wall:8.3f}{cpu:8.3f}")
        _print_tail(ours["stages"])
    print("parts of a warm text query, timed alone (ms):")
    for name, value in ours.get("parts", {}).items():
        print(f"  {name:56}{value:10.3f}")
    for key, clock in (("profile", "wall time"), ("cpu_profile", "CPU time of the handler's thread")):
        if not ours.get(key):
            continue
        print(f"profile of a new warm text query through the handler ({clock}, own time per query, ms, under cProfile):")
        for name, value in ours[key]["areas_ms_per_query"].items():
            print(f"  {name:28}{value:10.3f}")
        print("  functions with the most own time (ms per query, calls per query):")
        for name, value, calls in ours[key]["top_own_ms_per_query"][:15]:
            print(f"    {value:8.4f} {calls:6d}  {name}")
    print("scan alternatives (p50 ms per query, k=10):")
    for name, value in row["scans"].items():
        print(f"  {name:28}{value:10.3f}")
    sys.stdout.flush()


def _print_tail(stages: dict) -> None:
    """The slowest of the staged queries, stage by stage (ms wall / process CPU), and the collector's pauses."""
    if "slowest" not in stages:
        return
    print("  garbage collections during those queries (per 100 queries, median pause ms, longest pause ms): " + "; ".join(
        f"{generation} {per_100:.0f}, {median:.2f}, {longest:.2f}"
        for generation, (per_100, median, longest) in stages["gc"].items()))
    print("  the slowest of those queries (ms wall / CPU; the stages that took over 1 ms; gc = collector pauses in it):")
    for query in stages["slowest"]:
        wall, cpu = query["handler_ms"]
        parts = [f"{name.split(' (')[0]} {stage_wall:.1f}/{stage_cpu:.1f}"
                 for name, (stage_wall, stage_cpu) in query["stages_ms"].items() if stage_wall >= 1.0]
        collected = ", ".join(f"gen{generation} {pause:.1f}" for generation, pause in sorted(query["gc_ms"].items()))
        print(f"    {wall:6.1f} / {cpu:5.1f}: {'; '.join(parts)}; gc: {collected or 'none'}")


# Issue 8's targets, by size: (text p50 ms, text p99 ms, cold start s, peak RSS MB, recall@10); None: no target.
TARGETS = {1_000_000: (15, 30, 3.0, 1536, 0.95), 100_000: (15, None, 2.0, None, None)}


def _print_summary(rows: list[dict]) -> None:
    print(f"\nsummary (load average {' '.join(f'{value:.1f}' for value in os.getloadavg())}; "
          "new text = a text not asked before, repeated = answered from the query cache; "
          "targets in brackets, from issue 8):")
    print("| vectors | segment | warm text p50 ms | p99 ms | CPU ms per query | repeated text p50 ms | cold start s | "
          "cold start CPU s | peak RSS MB | recall@10 | speed-up over baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ours, baseline = row["ours"], row["baseline"]
        p50, p99, cold, rss, recall = TARGETS.get(row["size"], (None,) * 5)
        if "text_p50_ms" not in ours:  # --skip-warm
            print(f"| {row['size']:,} | {row['index_type']} | - | - | - | - | {ours['cold_start_s']:.2f}"
                  f"{_target(cold, '<=')} | {ours['cold_start_cpu_s']:.2f} | {ours['peak_rss_mb']:.0f}"
                  f"{_target(rss, '<=')} | {row['recall']:.3f}{_target(recall, '>=')} | - |")
            continue
        speedup = f"{baseline['text_p50_ms'] / ours['text_p50_ms']:.1f}x" if baseline else "-"
        print(f"| {row['size']:,} | {row['index_type']} | {ours['text_p50_ms']:.1f}{_target(p50, '<=')} | "
              f"{ours['text_p99_ms']:.1f}{_target(p99, '<=')} | {ours['text_cpu_ms']:.1f} | "
              f"{ours['repeated_text_p50_ms']:.1f} | {ours['cold_start_s']:.2f}{_target(cold, '<=')} | "
              f"{ours['cold_start_cpu_s']:.2f} | {ours['peak_rss_mb']:.0f}{_target(rss, '<=')} | "
              f"{row['recall']:.3f}{_target(recall, '>=')} | {speedup} |")
    _print_stage_summary(rows)


def _print_stage_summary(rows: list[dict]) -> None:
    """The stages of a new warm text query side by side for every size, under the CPU they ran on."""
    staged = [row for row in rows if row["ours"].get("stages")]
    if not staged:
        return
    print(f"\nwhere a new warm text query's p50 goes (each stage's own median, ms wall / ms process CPU, through the "
          f"handler; CPU: {cpu_description()}):")
    print("| stage | " + " | ".join(f"{row['size']:,}" for row in staged) + " |")
    print("|---|" + "---|" * len(staged))
    for stage in staged[0]["ours"]["stages"]["stages_ms"]:
        cells = [row["ours"]["stages"]["stages_ms"][stage] for row in staged]
        print(f"| {stage} | " + " | ".join(f"{wall:.2f} / {cpu:.2f}" for wall, cpu in cells) + " |")
    totals = [row["ours"]["stages"]["handler_ms"] for row in staged]
    print("| handler, total (median) | " + " | ".join(f"{wall:.2f} / {cpu:.2f}" for wall, cpu in totals) + " |")


def _target(value, relation: str) -> str:
    return "" if value is None else f" [{relation} {value}]"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated vector counts (1000000 optional)")
    parser.add_argument("--layouts", default="compacted,hnsw",
                        help="segment layouts to measure: compacted (the type compaction picks), hnsw")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="int8 model directory")
    parser.add_argument("--store", choices=("seaweed", "moto"), default="seaweed",
                        help="the local bucket: SeaweedFS (the local stack's; default) or moto in this process")
    parser.add_argument("--queries", type=int, default=200, help="warm text queries (ours)")
    parser.add_argument("--image-queries", type=int, default=40, help="warm image queries (ours)")
    parser.add_argument("--baseline-queries", type=int, default=15)
    parser.add_argument("--baseline-image-queries", type=int, default=8)
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest size to build an HNSW for comparison")
    parser.add_argument("--scans-max", type=int, default=100_000, help="largest size to compare in-memory scans at")
    parser.add_argument("--baseline-max", type=int, default=100_000,
                        help="largest size to run the baseline at (it reads the whole flat file per query)")
    parser.add_argument("--prepare", action="store_true",
                        help="only build the cached segment files (BENCH_CACHE_DIR) for --sizes, then exit")
    parser.add_argument("--formats", action="store_true", help="compare segment formats only (no services)")
    parser.add_argument("--formats-skip", default="", help="comma-separated formats to leave out (e.g. hnsw32_sq8)")
    parser.add_argument("--profile", action="store_true", help="add a cProfile of warm text queries (ours)")
    parser.add_argument("--verbose", action="store_true", help="show the timed log of each child process")
    parser.add_argument("--skip-warm", action="store_true",
                        help="measure the cold start only (no warm queries, formats, scans or baseline)")
    parser.add_argument("--child", choices=["service", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--index-file", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    sys.exit(main())
