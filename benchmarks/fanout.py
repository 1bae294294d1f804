"""Benchmark fan-out: a dataset over the per-function budget searched by shard searchers in parallel.

Clustered synthetic 512-d vectors in `--shards` segments of `--shard-size` (default 2 x 1M), each an
`ivf_sq8` segment as compaction writes them, one catalog row per vector in a throwaway PostgreSQL, the
segments in a moto S3 endpoint over HTTP. The search service runs in this process with the int8 text
tower; the shard searchers are the template's ShardSearchFunction run by the local stack's function runner
(child processes under the template's MemorySize, one instance per shard), reached through the same adapter
the local stack uses. Prints the CPU flags, warm text p50/p99, recall@10 of the fanned-out search against an
exact scan of every vector, and each shard process's peak RSS next to the budget.

    flock /tmp/bench-heavy.lock .venv/bin/python benchmarks/fanout.py [--shards 2] [--shard-size 1000000]

Generated vectors, exact answers and segment files are cached under /tmp/bench-cache/fanout/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import REPO, TEXT_QUERIES, cpu_description, peak_rss_mib
from search import (
    _SMALL_TRAINING_FROM,
    DEFAULT_MODEL,
    DIM,
    K,
    _environment,
    _latencies,
    _model_dir,
    _model_id,
    _services,
    _store,
    _write_with_small_training_sample,
)

CACHE = Path("/tmp/bench-cache/fanout")
CLUSTERS = 1000
RECALL_QUERIES = 100


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- data (cached) -----------------------------------------------------------------------------------


def _centres() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((CLUSTERS, DIM), dtype=np.float32)


def _shard_vectors(shard: int, count: int) -> np.ndarray:
    """Shard `shard`'s vectors: the same clusters in every shard, so a query's neighbours span shards."""
    path = CACHE / f"vectors-{count}-{shard}.npy"
    if not path.exists():
        rng = np.random.default_rng(100 + shard)
        centres = _centres()
        vectors = np.empty((count, DIM), dtype=np.float32)
        for start in range(0, count, 100_000):
            stop = min(count, start + 100_000)
            chunk = centres[rng.integers(0, CLUSTERS, stop - start)]
            chunk += 0.6 * rng.standard_normal(chunk.shape, dtype=np.float32)
            vectors[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        np.save(path, vectors)
        del vectors
    return np.load(path, mmap_mode="r")


def _shard_ids(shard: int, count: int) -> np.ndarray:
    """Catalog ids: rows are claimed in key order into a fresh catalog, so shard s holds s*count+1 ..."""
    return np.arange(shard * count + 1, (shard + 1) * count + 1, dtype=np.int64)


def _segment_file(shard: int, count: int) -> Path:
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.segments import SegmentVectors, choose_index

    path = CACHE / f"segment-{count}-{shard}.faiss"
    if not path.exists():
        spec = choose_index(count)
        started, cpu = time.perf_counter(), time.process_time()
        vectors = np.ascontiguousarray(_shard_vectors(shard, count))
        if count >= _SMALL_TRAINING_FROM:  # benchmarks/search.py's coarser k-means: recall can only be lower
            _write_with_small_training_sample(_shard_ids(shard, count), vectors, spec, path.with_suffix(".part"))
        else:
            FaissVectorIndex().write(SegmentVectors(_shard_ids(shard, count), vectors), spec, path.with_suffix(".part"))
        path.with_suffix(".part").rename(path)
        _log(f"shard {shard}: {count} vectors as {spec.kind} ({spec.lists} lists, {spec.probes} probes) in "
             f"{time.perf_counter() - started:.0f} s ({time.process_time() - cpu:.0f} s CPU)")
        del vectors
    return path


def _recall_queries(shards: int, count: int) -> np.ndarray:
    """Queries from the data's own distribution: stored vectors moved off their place by noise."""
    rng = np.random.default_rng(5)
    picks = [np.asarray(_shard_vectors(i % shards, count)[rng.integers(0, count)]) for i in range(RECALL_QUERIES)]
    queries = np.stack(picks) + 0.3 * rng.standard_normal((RECALL_QUERIES, DIM), dtype=np.float32) / np.sqrt(DIM)
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def _exact_top(shards: int, count: int, queries: np.ndarray) -> np.ndarray:
    """The exact top-K ids of every query over all shards (ties by id), cached."""
    path = CACHE / f"exact-{shards}x{count}.npy"
    if path.exists():
        return np.load(path)
    best_scores = np.full((len(queries), K), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), K), np.int64)
    for shard in range(shards):
        vectors, ids = _shard_vectors(shard, count), _shard_ids(shard, count)
        for start in range(0, count, 200_000):
            scores = np.asarray(vectors[start:start + 200_000]) @ queries.T  # [chunk, queries]
            top = np.argpartition(-scores, K, axis=0)[:K].T
            chunk_scores = np.take_along_axis(scores.T, top, axis=1)
            merged_scores = np.concatenate([best_scores, chunk_scores], axis=1)
            merged_ids = np.concatenate([best_ids, ids[start:start + 200_000][top]], axis=1)
            order = np.lexsort((merged_ids, -merged_scores), axis=1)[:, :K]
            best_scores = np.take_along_axis(merged_scores, order, axis=1)
            best_ids = np.take_along_axis(merged_ids, order, axis=1)
    np.save(path, best_ids)
    return best_ids


# --- measurement -------------------------------------------------------------------------------------


def _catalog_rows(database_url: str, catalog, bucket: str, dataset: str, model_id: str, segments: list[str],
                  count: int) -> None:
    """One indexed row per vector (ids s*count+1 ...) in its shard's segment, written with COPY: the catalog's
    own claim and commit took ~2 s per 1,000 rows here (247 s for 120k), an hour for 2M."""
    import psycopg
    from clipsearch.datasets import image_key, segment_key
    from clipsearch.segments import IVF_SQ8

    row = catalog.ensure_dataset(dataset, model_id)
    with psycopg.connect(database_url) as connection:
        for shard, segment_id in enumerate(segments):
            connection.execute(
                "INSERT INTO segments (id, dataset_id, object_key, vector_count, index_type, created_version)"
                " VALUES (%s, %s, %s, %s, %s, 1)",
                (segment_id, row.id, segment_key(dataset, segment_id), count, IVF_SQ8))
        with connection.cursor().copy(
            "COPY images (id, dataset_id, bucket, object_key, etag, source_path, sha256, byte_size, width, height,"
            " status, segment_id) FROM STDIN"
        ) as copy:
            for shard, segment_id in enumerate(segments):
                for image_id in _shard_ids(shard, count).tolist():
                    name = f"img{image_id:08d}.jpg"
                    copy.write(f"{image_id}\t{row.id}\t{bucket}\t{image_key(dataset, name)}\tetag{image_id}\t"
                               f"/data/photos/{name}\t{'0' * 64}\t1000\t640\t480\tindexed\t{segment_id}\n")
        connection.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), %s)", (len(segments) * count,))
        connection.execute("UPDATE datasets SET index_version = 1 WHERE id = %s", (row.id,))


def _process_peak_rss_mib(pid: int) -> tuple[float, float]:
    """(peak, current) resident memory of another process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmHWM"], fields["VmRSS"]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of other processes so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _measure(args, segment_files: list[Path], queries: np.ndarray, truth: np.ndarray) -> int:
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
    from clipsearch.adapters.postgres_connection import Database
    from clipsearch.config import SHARD_RUNTIME_RESERVE_MB, Settings
    from clipsearch.encoders import OnnxTextEncoder
    from clipsearch.model_files import ModelFiles
    from clipsearch.search import SearchService
    from clipsearch.search_results import ImageFilter
    from clipsearch_tools.local.function_environment import FunctionEnvironment
    from clipsearch_tools.local.functions import FunctionHost
    from clipsearch_tools.local.shard_invoker import FunctionHostShardSearcher
    from clipsearch_tools.local.state import StackState
    from clipsearch.datasets import segment_key
    from clipsearch.wiring import service_client
    from clipsearch_tools.local.template import load_template

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    model_dir = _model_dir(args.model)
    model_id = _model_id(model_dir)
    dataset = "fanout"
    segment_bytes = max(path.stat().st_size for path in segment_files)
    # Lowered so that this dataset fans out, one segment per shard: at the template's settings (a 1,984 MB
    # search budget) 2 x 1M ivf_sq8 would still be searched by the search function alone.
    budget = int(segment_bytes * 1.2)
    shard_function = load_template(REPO / "template.yaml").functions["ShardSearchFunction"]
    shard_memory_budget = Settings(bucket="", model_id="", function_memory_mb=shard_function.memory_size).shard_cache_bytes
    if budget > shard_memory_budget:
        raise RuntimeError(f"a shard of {budget} bytes would not fit ShardSearchFunction's {shard_memory_budget:.0f}")
    with _services() as (endpoint, database_url), tempfile.TemporaryDirectory(prefix="fanout-bench-") as scratch:
        environment = _environment(endpoint, database_url, model_dir, Path(scratch))
        store = _store(environment)
        database = Database(database_url)
        migrate(database)
        catalog = PostgresCatalog(database)
        started = time.perf_counter()
        segment_ids = [f"{shard:013d}-fanout" for shard in range(args.shards)]
        _catalog_rows(database_url, catalog, store.bucket, dataset, model_id, segment_ids, args.shard_size)
        s3 = service_client("s3", Settings.from_env(environment))
        for segment_id, path in zip(segment_ids, segment_files):
            s3.upload_file(str(path), store.bucket, segment_key(dataset, segment_id))
        _log(f"{args.shards} x {args.shard_size} rows and segments published in {time.perf_counter() - started:.0f} s")

        state = StackState(status="ready", home=scratch, pid=0, log_file=str(Path(scratch) / "stack.log"),
                           bucket=store.bucket, model_id=model_id, database_url=database_url,
                           s3_endpoint_url=endpoint, sqs_endpoint_url=endpoint, queue_url="unused")
        host = FunctionHost(FunctionEnvironment(state), runtime_dir=Path(scratch) / "functions")
        try:
            encoder = OnnxTextEncoder.from_model_files(ModelFiles.open(model_dir), threads=1)  # as wiring builds it
            shards = FunctionHostShardSearcher(host, shard_function)
            service = SearchService(
                catalog=catalog, store=store, model_id=model_id, text_encoder=lambda: encoder,
                image_encoder=lambda: None, max_image_bytes=6 * 2**20, vector_index=FaissVectorIndex(),
                segment_dir=Path(scratch) / "segments", index_cache_bytes=budget, shard_searcher=shards,
                shard_budget_bytes=budget,
            )
            started = time.perf_counter()
            first = service.search_text(dataset, TEXT_QUERIES[0], k=K)
            cold_s = time.perf_counter() - started
            if len(first.hits) != K:
                raise RuntimeError(f"the first query found {len(first.hits)} hits")
            # Distinct texts: no query is answered from an embedding cache; the tower runs every time.
            texts = [f"{TEXT_QUERIES[i % len(TEXT_QUERIES)]} {i}" for i in range(args.queries)]
            load_before = os.getloadavg()[0]
            shard_pids = host.instance_pids(shard_function)
            cpu_before, shard_cpu_before = time.process_time(), _cpu_seconds(shard_pids)
            text_ms = _latencies(lambda text: service.search_text(dataset, text, k=K), texts)
            cpu_per_query_ms = (time.process_time() - cpu_before) * 1000 / len(texts)
            shard_cpu_per_query_ms = (_cpu_seconds(shard_pids) - shard_cpu_before) * 1000 / len(texts)
            load_after = os.getloadavg()[0]

            from clipsearch.shards import ShardedIndex, plan_shards
            from clipsearch.search import SegmentLoader
            from concurrent.futures import ThreadPoolExecutor

            row = catalog.get_dataset(dataset)
            sized = SegmentLoader(store, FaissVectorIndex(), Path(scratch) / "sizes").sized(catalog.live_segments(row.id))
            plan = ShardedIndex(row.id, dataset, row.index_version, plan_shards(sized, budget))
            with ThreadPoolExecutor(max_workers=len(plan.shards)) as pool:
                found = [[image_id for image_id, _ in plan.search(shards, pool, query, K, ImageFilter())]
                         for query in queries]
            recall = float(np.mean([len(set(hits) & set(expected.tolist())) / K for hits, expected in zip(found, truth)]))

            shard_rss = [_process_peak_rss_mib(pid) for pid in host.instance_pids(shard_function)]
        finally:
            host.stop()
            database.close()

    print(f"\n== fan-out: {args.shards} shards x {args.shard_size:,} clustered 512-d vectors (ivf_sq8, "
          f"{segment_bytes / 2**20:.0f} MiB per segment) ==")
    print(f"plan: {len(plan.shards)} shards, budget {budget / 2**20:.0f} MiB per shard "
          f"(ShardSearchFunction: MemorySize {shard_function.memory_size} MB, segment budget "
          f"{shard_memory_budget / 2**20:.0f} MiB = MemorySize - {SHARD_RUNTIME_RESERVE_MB})")
    print(f"load average during the warm queries: {load_before:.1f} -> {load_after:.1f} (2 cores)")
    print(f"cold first query (shards fetch and map their segments): {cold_s:.2f} s")
    print(f"warm text p50 {np.percentile(text_ms, 50):.2f} ms, p99 {np.percentile(text_ms, 99):.2f} ms "
          f"over {len(text_ms)} queries (target p50 <= 40 ms)")
    print(f"CPU per warm query: search process {cpu_per_query_ms:.2f} ms (text tower, fan-out, merge, paths), "
          f"shard processes together {shard_cpu_per_query_ms:.2f} ms")
    print(f"recall@10 vs exact search over all {args.shards * args.shard_size:,} vectors: {recall:.3f} "
          f"({RECALL_QUERIES} queries; target >= 0.95)")
    for number, (peak, current) in enumerate(shard_rss):
        print(f"shard process {number}: peak RSS {peak:.0f} MiB, now {current:.0f} MiB "
              f"(MemorySize {shard_function.memory_size} MB: {'within' if peak <= shard_function.memory_size else 'OVER'})")
    print(f"harness peak RSS {peak_rss_mib():.0f} MiB (moto holds the segment objects in this process)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/fanout.py")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--prepare-only", action="store_true", help="build the cached vectors and segments, then stop")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    segment_files = [_segment_file(shard, args.shard_size) for shard in range(args.shards)]
    queries = _recall_queries(args.shards, args.shard_size)
    truth = _exact_top(args.shards, args.shard_size, queries)
    if args.prepare_only:
        print(f"prepared {len(segment_files)} segments, {len(truth)} exact answers; peak RSS {peak_rss_mib():.0f} MiB")
        return 0
    return _measure(args, segment_files, queries, truth)


if __name__ == "__main__":
    sys.exit(main())
