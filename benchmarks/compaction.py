"""Benchmark bounded compaction: peak memory and the longest step when a 1M-vector dataset is compacted.

Clustered synthetic 512-d vectors (benchmarks/search.py's generator) stored as N flat segments in a moto
S3 endpoint over HTTP, one catalog row per vector in a throwaway PostgreSQL, a share of them deleted.
A fresh process builds the compaction service as the function does (clipsearch.wiring, the template's
CLIPSEARCH_SEARCH_MEMORY_MB) and runs it one output segment per call, as scheduled invocations would,
until nothing is left to merge; it prints each step's wall and CPU time and its own peak RSS. Then the
harness checks that the live set is kept exactly (each live id in one live segment) and every segment is
within the cap.

    flock /tmp/bench-heavy.lock .venv/bin/python benchmarks/compaction.py [--vectors 1000000] [--segments 20]

Segment files are cached under /tmp/bench-cache/compaction/ (about 2 GB at 1M).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import cpu_description, peak_rss_mib
from search import _clustered, _services  # moto S3 + a throwaway PostgreSQL, as the search benchmark runs them

CACHE_DIR = Path("/tmp/bench-cache/compaction")
DATASET = "bench"
MODEL_ID = "bench-model"
SEARCH_MEMORY_MB = "3008"  # template.yaml: CompactFunction's CLIPSEARCH_SEARCH_MEMORY_MB
_DELETE_CHUNK = 10_000


def main() -> int:
    args = _parser().parse_args()
    if args.child:
        return _child(args.max_segment_vectors)
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its PostgreSQL
    print(f"CPU: {cpu_description()}", flush=True)
    files = _segment_files(args.vectors, args.segments)
    with _services() as (endpoint, database_url):
        environment = _environment(endpoint, database_url)
        deleted = _load_dataset(environment, files, args.vectors, args.deleted)
        _log(f"dataset: {args.vectors} vectors in {len(files)} segments, {len(deleted)} deleted; "
             f"harness peak RSS so far {peak_rss_mib():.0f} MiB")
        started = time.perf_counter()
        command = [sys.executable, __file__, "--child"]
        if args.max_segment_vectors:
            command += ["--max-segment-vectors", str(args.max_segment_vectors)]
        child = subprocess.run(command, env=environment, stdout=subprocess.PIPE, text=True)  # its log: our stderr
        total = time.perf_counter() - started
        if child.returncode:
            raise RuntimeError(f"compaction process failed ({child.returncode})")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        check = _check(environment, args.vectors, deleted, result["capacity"])
    _print(args, result, check, total)
    return 0


# --- data --------------------------------------------------------------------------------------------


def _segment_files(count: int, segments: int) -> list[tuple[np.ndarray, Path]]:
    """`segments` flat segment files of consecutive ids 1..count (the ids a fresh catalog hands out), built once."""
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.segments import SegmentVectors, choose_index

    bounds = np.linspace(0, count, segments + 1).astype(np.int64)
    files = [(np.arange(start + 1, stop + 1, dtype=np.int64), CACHE_DIR / f"{count}-{segments}-{position:03d}.faiss")
             for position, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]))]
    if all(path.exists() for _, path in files):
        return files
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    _log(f"generating {count} clustered vectors and {segments} segment files under {CACHE_DIR}")
    vectors = _clustered(count, seed=8)
    for ids, path in files:
        content = SegmentVectors(ids, vectors[ids[0] - 1:ids[-1]])
        partial = path.with_suffix(".partial")
        FaissVectorIndex().write(content, choose_index(len(ids)), partial)
        partial.rename(path)
    return files


def _environment(endpoint: str, database_url: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "CLIPSEARCH_BUCKET": "clipsearch-bench",
        "CLIPSEARCH_MODEL_ID": MODEL_ID,
        "CLIPSEARCH_DATABASE_URL": database_url,
        "CLIPSEARCH_S3_ENDPOINT_URL": endpoint,
        "CLIPSEARCH_SEARCH_MEMORY_MB": SEARCH_MEMORY_MB,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
    }


def _load_dataset(environment: dict[str, str], files, count: int, deleted_share: float) -> np.ndarray:
    """Uploads the segment files (streamed) and writes one indexed catalog row per vector with COPY (the
    rows an ingest would have committed: ingest's per-batch commit is built for batches, not for 1M rows at
    once); then deletes a spread-out share of the images through the catalog; returns the deleted ids."""
    from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
    from clipsearch.config import Settings
    from clipsearch.datasets import image_key, segment_key
    from clipsearch.segments import choose_index
    from clipsearch.wiring import build_database, service_client

    settings = Settings.from_env(environment)
    s3 = service_client("s3", settings)
    s3.create_bucket(Bucket=settings.bucket)
    database = build_database(settings)
    migrate(database)
    catalog = PostgresCatalog(database)
    dataset = catalog.ensure_dataset(DATASET, MODEL_ID)
    with database.transaction() as connection:
        version = connection.execute(
            "UPDATE datasets SET index_version = index_version + 1 WHERE id = %s RETURNING index_version",
            (dataset.id,),
        ).fetchone()["index_version"]
        for position, (ids, path) in enumerate(files):
            segment_id = f"bench-{position:03d}"
            object_key = segment_key(DATASET, segment_id)
            s3.upload_file(str(path), settings.bucket, object_key)
            connection.execute(
                "INSERT INTO segments (id, dataset_id, object_key, vector_count, index_type, created_version)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (segment_id, dataset.id, object_key, len(ids), choose_index(len(ids)).kind, version),
            )
            with connection.cursor().copy(
                "COPY images (id, dataset_id, bucket, object_key, etag, status, segment_id, width, height)"
                " FROM STDIN"
            ) as copy:
                for image_id in ids.tolist():
                    copy.write_row((image_id, dataset.id, settings.bucket,
                                    image_key(DATASET, f"img{image_id:07d}.jpg"), f"etag{image_id}", "indexed",
                                    segment_id, 640, 480))
        connection.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), %s)", (count,))
    deleted = np.arange(1, count + 1, max(1, round(1 / deleted_share)), dtype=np.int64) if deleted_share else (
        np.empty(0, np.int64))
    for start in range(0, len(deleted), _DELETE_CHUNK):
        catalog.remove_image_ids(dataset.id, deleted[start:start + _DELETE_CHUNK].tolist())
    database.close()
    return deleted


# --- the compaction process ----------------------------------------------------------------------------


def _child(max_segment_vectors: int | None) -> int:
    """One output segment per call, as many calls as the plan needs; each call's wall and CPU time."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from dataclasses import replace

    from clipsearch.wiring import get_compaction_service

    service = get_compaction_service()
    policy = service.policy
    if max_segment_vectors:
        policy = replace(policy, max_segment_vectors=max_segment_vectors)
        service = service.with_policy(policy)
    steps = []
    while True:
        wall, cpu = time.perf_counter(), time.process_time()
        report = service.compact_dataset(DATASET, max_segments_written=1)
        steps.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                      "written": report.segments_written, "kept": report.vectors_kept,
                      "dropped": report.vectors_dropped, "kinds": report.index_types,
                      "load": os.getloadavg()[0], "rss_mib": peak_rss_mib()})
        if not report.groups_pending or not report.segments_written:
            break
    print(json.dumps({"steps": steps, "peak_rss_mib": peak_rss_mib(), "capacity": policy.segment_capacity,
                      "segments_per_run": policy.segments_per_run}))
    return 0


# --- checks and output -----------------------------------------------------------------------------------


def _check(environment: dict[str, str], count: int, deleted: np.ndarray, capacity: int) -> dict:
    """Each live id in exactly one live segment (by the segments' own id maps), every segment within the cap."""
    from clipsearch.adapters.faiss_index import FaissVectorIndex
    from clipsearch.adapters.postgres_catalog import PostgresCatalog
    from clipsearch.config import Settings
    from clipsearch.wiring import build_database, build_object_store

    settings = Settings.from_env(environment)
    database = build_database(settings)
    catalog = PostgresCatalog(database)
    store = build_object_store(settings)
    dataset = catalog.get_dataset(DATASET)
    members = catalog.segment_members(dataset.id)
    counted = np.zeros(count + 1, np.int32)
    sizes = []
    with tempfile.TemporaryDirectory(prefix="compaction-bench-check-") as scratch:
        for segment in catalog.live_segments(dataset.id):
            path = Path(scratch) / "segment"
            store.download_file(segment.object_key, path)
            ids = FaissVectorIndex().open(path).ids
            path.unlink()
            live = ids[np.fromiter((members.get(int(i)) == segment.id for i in ids), bool, len(ids))]
            np.add.at(counted, live, 1)
            sizes.append((segment.index_type, len(ids)))
    database.close()
    expected = np.ones(count + 1, np.int32)
    expected[0] = 0
    expected[deleted] = 0
    return {"live_set_exact": bool(np.array_equal(counted, expected)), "live": int(expected.sum()),
            "segments": sizes, "within_cap": all(size <= capacity for _, size in sizes)}


def _print(args, result: dict, check: dict, total: float) -> None:
    steps = result["steps"]
    longest = max(steps, key=lambda step: step["wall_s"])
    print(f"\nbounded compaction of {args.vectors} vectors in {args.segments} segments "
          f"({len(check['segments'])} live segments after), capacity {result['capacity']} vectors per segment")
    print("| step | segments written | vectors kept | dropped | kind | wall s | CPU s | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for number, step in enumerate(steps, 1):
        print(f"| {number} | {step['written']} | {step['kept']} | {step['dropped']} | {','.join(step['kinds']) or '-'} "
              f"| {step['wall_s']:.1f} | {step['cpu_s']:.1f} | {step['load']:.1f} |")
    print(f"compaction process peak RSS: {result['peak_rss_mib']:.0f} MiB (target <= 3072)")
    print(f"longest step: {longest['wall_s']:.1f} s wall, {longest['cpu_s']:.1f} s CPU (target <= 450 s, half the "
          f"compaction function's 900 s timeout); total {total:.1f} s (process start to exit)")
    print(f"at {result['segments_per_run']} segments per invocation: "
          f"{-(-sum(step['written'] for step in steps) // result['segments_per_run'])} scheduled invocations")
    print(f"live set kept exactly: {check['live_set_exact']} ({check['live']} live vectors); every segment "
          f"within the cap: {check['within_cap']}; segments after: {check['segments']}")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--segments", type=int, default=20)
    parser.add_argument("--deleted", type=float, default=0.02, help="share of images deleted before compacting")
    parser.add_argument("--max-segment-vectors", type=int, default=0,
                        help="the cap instead of the policy's default (small trial runs)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
