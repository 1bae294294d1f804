"""Benchmark ingestion: img/s from upload to searchable, next to model-only img/s measured in the same run.

Starts its own services: a throwaway PostgreSQL cluster and a moto S3+SQS server (its own process) with
real bucket notifications to a real queue. For each image set (photo-sized JPEGs of ~1-3 MP made from
the seed-eval photos, and small 256x256 JPEGs) it uploads everything from a thread while a queue runner
(as Lambda's SQS event source: receive, batch, invoke the real preprocessing handler, delete what did
not fail) indexes it; the clock stops when the catalog counts every image indexed and its segments are
committed. Model-only throughput is OnnxImageEncoder.embed_images on the same bytes held in memory
(decode + preprocess + inference), i.e. everything but S3, SQS, PostgreSQL and segment writes.

    .venv/bin/python benchmarks/ingest.py [--photos 1000] [--small 10000] [--batch 64] [--threads 2]
    .venv/bin/python benchmarks/ingest.py --photos 60 --small 300        # quick run, < 3 min
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_common import MODELS, REPO, SEED_EVAL
from PIL import Image, ImageEnhance

DEFAULT_MODEL = MODELS / "random-vit-b-32-seed0-int8"
EXPORT_HINT = (
    "python -m model_export --random-arch vit-b-32 --seed 0 --quantize int8 "
    "--out .cache/models/random-vit-b-32-seed0-int8"
)
MODEL_ONLY_SAMPLE = 256
BATCH_WINDOW_SECONDS = 1.0


@dataclass
class Context:  # what Powertools reads from a Lambda context
    function_name: str = "clipsearch-preprocess-benchmark"
    memory_limit_in_mb: int = 3008
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:benchmark"
    aws_request_id: str = "benchmark"


def photo_sized(sources: list[bytes], count: int, seed: int) -> list[bytes]:
    """JPEGs of ~1-3 MP: seed-eval photos upscaled, cropped, flipped, with light and noise variations."""
    rng = np.random.default_rng(seed)
    images = []
    for position in range(count):
        base = Image.open(io.BytesIO(sources[position % len(sources)])).convert("RGB")
        megapixels = rng.uniform(1.0, 3.0)
        aspect = base.width / base.height * rng.uniform(0.8, 1.25)
        width = int((megapixels * 1e6 * aspect) ** 0.5)
        height = int(megapixels * 1e6 / width)
        big = base.resize((int(width * 1.1), int(height * 1.1)), Image.BICUBIC)
        left, top = rng.integers(0, big.width - width + 1), rng.integers(0, big.height - height + 1)
        big = big.crop((left, top, left + width, top + height))
        if rng.random() < 0.5:
            big = big.transpose(Image.FLIP_LEFT_RIGHT)
        big = ImageEnhance.Brightness(big).enhance(rng.uniform(0.8, 1.2))
        pixels = np.asarray(big, dtype=np.int16) + rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=int(rng.integers(80, 95)))
        images.append(out.getvalue())
    return images


def small(sources: list[bytes], count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    for position in range(count):
        base = Image.open(io.BytesIO(sources[position % len(sources)])).convert("RGB")
        side = int(min(base.size) * rng.uniform(0.6, 1.0))
        left, top = rng.integers(0, base.width - side + 1), rng.integers(0, base.height - side + 1)
        tile = base.crop((left, top, left + side, top + side)).resize((256, 256), Image.BICUBIC)
        tile = ImageEnhance.Color(tile).enhance(rng.uniform(0.7, 1.3))
        out = io.BytesIO()
        tile.save(out, "JPEG", quality=int(rng.integers(75, 95)))
        images.append(out.getvalue())
    return images


def start_moto(port: int, log: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"moto server did not start (log: {log})")


def model_only(encoder, images: list[bytes]) -> float:
    from clipsearch.ports import ImageInput

    sample = [ImageInput(f"sample-{i}", data) for i, data in enumerate(images[:MODEL_ONLY_SAMPLE])]
    encoder.embed_images(sample[: encoder.batch_size])  # warm-up
    started = time.perf_counter()
    results = encoder.embed_images(sample)
    elapsed = time.perf_counter() - started
    assert all(hasattr(result, "vector") for result in results)
    return len(sample) / elapsed


def run_queue(handler_module, service, sqs, queue_url: str, queue_arn: str, done: threading.Event,
              batch: int, busy: list[float]) -> None:
    """Lambda's SQS event source in miniature: batch up to `batch` messages or one window, invoke, delete.

    Appends the seconds spent inside the handler to `busy`.
    """
    context = Context()
    while not done.is_set():
        messages, window_end = [], time.monotonic() + BATCH_WINDOW_SECONDS
        while len(messages) < batch and time.monotonic() < window_end:
            wait = 1 if not messages else 0  # long-poll only while idle: polling costs moto CPU on our cores
            messages += sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait,
                                            VisibilityTimeout=300).get("Messages", [])
        if not messages:
            continue
        event = {"Records": [
            {"messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
             "attributes": {}, "messageAttributes": {}, "md5OfBody": m["MD5OfBody"],
             "eventSource": "aws:sqs", "eventSourceARN": queue_arn, "awsRegion": "us-east-1"}
            for m in messages
        ]}
        invoked = time.perf_counter()
        response = handler_module.handle(event, context, service)
        busy.append(time.perf_counter() - invoked)
        failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                   for i, m in enumerate(messages) if m["MessageId"] not in failed]
        for start in range(0, len(entries), 10):
            sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries[start : start + 10])


@dataclass
class Run:
    seconds: float  # first upload -> every image indexed or failed in the catalog
    upload_seconds: float  # first upload -> last upload acknowledged
    handler_seconds: float  # summed over invocations
    invocations: int
    moto_cpu_seconds: float  # what the local S3/SQS stand-in took from the same 2 cores
    counts: dict


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def end_to_end(stack: dict, dataset: str, images: list[bytes], batch: int) -> Run:
    from clipsearch.errors import DatasetNotFound

    s3, catalog = stack["s3"], stack["catalog"]
    done = threading.Event()
    busy: list[float] = []
    runners = [
        threading.Thread(
            target=run_queue,
            args=(stack["handler"], service, stack["sqs"], stack["queue_url"], stack["queue_arn"], done, batch, busy),
            daemon=True,
        )
        for service in stack["services"]
    ]
    moto_cpu = cpu_seconds(stack["moto_pid"])
    started = time.perf_counter()
    uploaded_at: list[float] = []
    for runner in runners:
        runner.start()

    def upload(position: int) -> None:
        s3.put_object(Bucket=stack["bucket"], Key=f"datasets/{dataset}/img-{position:06d}.jpg",
                      Body=images[position], ContentType="image/jpeg")
        uploaded_at.append(time.perf_counter())

    with ThreadPoolExecutor(4) as pool:
        uploads = pool.map(upload, range(len(images)))
        try:
            while True:
                try:
                    counts = catalog.summarize_dataset(dataset).counts
                except DatasetNotFound:  # the dataset row appears with the first batch
                    counts = {}
                if counts.get("indexed", 0) + counts.get("failed", 0) >= len(images):
                    break
                time.sleep(0.2)
        finally:
            list(uploads)
    elapsed = time.perf_counter() - started
    done.set()
    for runner in runners:
        runner.join()
    return Run(elapsed, max(uploaded_at) - started, sum(busy), len(busy),
               cpu_seconds(stack["moto_pid"]) - moto_cpu, dict(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=1000, help="photo-sized JPEGs (~1-3 MP)")
    parser.add_argument("--small", type=int, default=10000, help="small 256x256 JPEGs")
    parser.add_argument("--batch", type=int, default=64, help="SQS messages per handler invocation")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="handler instances running at once (Lambda concurrency), sharing one ORT session")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")  # EMF lines on stdout would drown the table
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")

    if not (args.model / "manifest.json").exists():
        sys.exit(f"{args.model} is missing; export it first:\n  {EXPORT_HINT}")
    sources = [path.read_bytes() for path in sorted(SEED_EVAL.glob("*/*.jp*g"))]
    if not sources:
        sys.exit(f"no seed-eval photos under {SEED_EVAL}")

    import importlib.util

    import boto3
    from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
    from clipsearch.adapters.postgres_connection import Database
    from clipsearch.adapters.s3_store import S3ObjectStore
    from clipsearch.encoders import OnnxImageEncoder
    from clipsearch.ingest import IngestService
    from clipsearch.local.postgres import free_port, start_cluster
    from clipsearch.model_files import ModelFiles

    print(f"generating {args.photos} photo-sized and {args.small} small JPEGs ...", flush=True)
    sets = {"photos": photo_sized(sources, args.photos, 0), "small": small(sources, args.small, 1)}

    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-") as scratch:
        cluster = start_cluster(Path(scratch) / "pg")
        port = free_port()
        moto = start_moto(port, Path(scratch) / "moto.log")
        try:
            endpoint = f"http://127.0.0.1:{port}"
            from botocore.config import Config

            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              config=Config(max_pool_connections=16))
            sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
            bucket = "clipsearch-bench"
            s3.create_bucket(Bucket=bucket)
            queue_url = sqs.create_queue(QueueName="ingest")["QueueUrl"]
            queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [{
                "QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "datasets/"}]}},
            }]})
            database = Database(cluster.url)
            migrate(database)
            files = ModelFiles.open(args.model)
            encoder = OnnxImageEncoder.from_model_files(files, threads=args.threads)
            catalog = PostgresCatalog(database)
            databases = [Database(cluster.url) for _ in range(args.concurrency)]
            spec = importlib.util.spec_from_file_location("preprocess_app", REPO / "functions/preprocess/app.py")
            handler = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(handler)
            stack = {
                "s3": s3, "sqs": sqs, "bucket": bucket, "queue_url": queue_url, "queue_arn": queue_arn,
                "catalog": catalog, "handler": handler, "moto_pid": moto.pid,
                "services": [IngestService(S3ObjectStore(s3, bucket), PostgresCatalog(db), encoder, files.model_id)
                             for db in databases],
            }
            rows = []
            for name, images in sets.items():
                if not images:
                    continue
                model_rate = model_only(encoder, images)
                run = end_to_end(stack, f"bench_{name}", images, args.batch)
                segments = catalog.live_segments(catalog.get_dataset(f"bench_{name}").id)
                rows.append((name, len(images), sum(map(len, images)) / len(images) / 1024, model_rate,
                             run, len(segments)))
            for db in [database, *databases]:
                db.close()
        finally:
            moto.terminate()
            moto.wait()
            cluster.stop()

    print(f"\nmodel {files.model_id}, {args.threads} ORT threads, {args.batch} messages per invocation, "
          f"{args.concurrency} concurrent handler(s), "
          f"{os.cpu_count()} CPUs")
    print(f"{'set':<8}{'images':>8}{'avg KiB':>9}{'model-only img/s':>18}{'end-to-end img/s':>18}"
          f"{'ratio':>7}{'seconds':>9}{'uploads s':>11}{'in handler s':>14}{'handler img/s':>15}{'invocations':>13}"
          f"{'moto CPU s':>12}{'segments':>10}  statuses")
    for name, count, kib, model_rate, run, segments in rows:
        e2e_rate = count / run.seconds
        print(f"{name:<8}{count:>8}{kib:>9.0f}{model_rate:>18.1f}{e2e_rate:>18.1f}{e2e_rate / model_rate:>7.0%}"
              f"{run.seconds:>9.1f}{run.upload_seconds:>11.1f}{run.handler_seconds:>14.1f}"
              f"{count / run.handler_seconds:>15.1f}{run.invocations:>13}"
              f"{run.moto_cpu_seconds:>12.1f}{segments:>10}  {run.counts}")


if __name__ == "__main__":
    main()
