"""Benchmark ingestion: img/s from upload to searchable, next to model-only img/s measured in the same run.

Starts its own services: a throwaway PostgreSQL cluster, a moto server (its own process) for SQS, and
for the bucket either the local stack's SeaweedFS server with its filer change feed turned into S3
notifications (`--storage seaweed`, as `clipsearch local up` runs it) or moto's S3 with real bucket
notifications (`--storage moto`). For each image set (photo-sized JPEGs of ~1-3 MP made from the
seed-eval photos, and small 256x256 JPEGs) it uploads everything from a small thread pool while a queue
runner (as Lambda's SQS event source: receive, batch up to `--batch` messages or the template's batching
window, invoke the real preprocessing handler, delete what did not fail) indexes it; the clock stops
when the catalog counts every image indexed and its segments are committed. Model-only throughput is
OnnxImageEncoder.embed_images on the same bytes held in memory (decode + preprocess + inference), i.e.
everything but S3, SQS, PostgreSQL and segment writes.

    .venv/bin/python benchmarks/ingest.py [--photos 1000] [--small 10000] [--batch 64] [--storage seaweed]
    .venv/bin/python benchmarks/ingest.py --photos 60 --small 300        # quick run, < 3 min
"""

from __future__ import annotations

import argparse
import contextlib
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
REGION = "us-east-1"
KEYS = ("bench", "bench")  # access key id, secret: SeaweedFS accepts only these
RECEIVE_MAX = 10  # SQS's ReceiveMessage limit


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
        [sys.executable, str(Path(__file__).with_name("moto_sqs.py")), "-H", "127.0.0.1", "-p", str(port)],
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


@dataclass
class Services:
    """Where the benchmark's bucket and queue live."""

    s3: object
    sqs: object
    bucket: str
    queue_url: str
    queue_arn: str


def client(service: str, endpoint_url: str):
    from clipsearch.local.aws import aws_client

    return aws_client(service, REGION, endpoint_url, *KEYS)


def start_services(storage: str, scratch: Path, template, stack: contextlib.ExitStack) -> Services:
    """The queue on moto; the bucket on SeaweedFS with its filer event feed, or on moto with its notifications."""
    from clipsearch.local.postgres import free_port

    port = free_port()
    moto = start_moto(port, scratch / "moto.log")
    stack.callback(moto.wait)
    stack.callback(moto.terminate)
    sqs = client("sqs", f"http://127.0.0.1:{port}")
    queue_url = sqs.create_queue(QueueName="ingest")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    bucket = "clipsearch-bench"
    if storage == "moto":
        s3 = client("s3", f"http://127.0.0.1:{port}")
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [
            {"QueueArn": queue_arn, "Events": [rule.event], "Filter": {"Key": {"FilterRules": [
                {"Name": name, "Value": value} for name, value in (("prefix", rule.prefix), ("suffix", rule.suffix))
                if value
            ]}}}
            for rule in template.notifications
        ]})
        return Services(s3, sqs, bucket, queue_url, queue_arn)
    from clipsearch.local.seaweed import FilerEventFeed, SeaweedServer

    server = SeaweedServer(scratch / "objects", scratch / "seaweedfs.log", *KEYS)
    stack.callback(server.stop)
    server.start(lambda url: client("s3", url))
    s3 = client("s3", server.s3_url)
    s3.create_bucket(Bucket=bucket)
    feed = FilerEventFeed(server, bucket, template.notifications,
                          lambda body: sqs.send_message(QueueUrl=queue_url, MessageBody=body),
                          scratch / "seaweedfs.log")
    feed.start()
    stack.callback(feed.stop)
    return Services(s3, sqs, bucket, queue_url, queue_arn)


def service_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process's moto and weed children (the S3/SQS stand-ins)."""
    totals = {"moto": 0.0, "weed": 0.0}
    children = " ".join(path.read_text() for path in Path("/proc/self/task").glob("*/children")).split()
    for pid in children:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # exited since the listing
            continue
        name = "moto" if any(b"moto" in arg for arg in argv[:2]) else "weed" if Path(argv[0].decode()).name == "weed" else None
        if name:
            totals[name] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return totals


def model_only(encoder, images: list[bytes]) -> float:
    from clipsearch.ports import ImageInput

    sample = [ImageInput(f"sample-{i}", data) for i, data in enumerate(images[:MODEL_ONLY_SAMPLE])]
    encoder.embed_images(sample[: encoder.batch_size])  # warm-up
    started = time.perf_counter()
    results = encoder.embed_images(sample)
    elapsed = time.perf_counter() - started
    assert all(hasattr(result, "vector") for result in results)
    return len(sample) / elapsed


class QueuePoller:
    """Lambda's SQS event source in miniature: batch up to `batch` messages or one window, invoke, delete.

    Receives of 10 run several at once, so a batch fills in one round trip once the queue holds it.
    """

    def __init__(self, services: Services, batch: int, window: float) -> None:
        self._services = services
        self._batch = batch
        self._window = window
        self._receivers = ThreadPoolExecutor(-(-batch // RECEIVE_MAX), thread_name_prefix="receive")
        self.busy: list[float] = []  # seconds inside the handler, per invocation
        self.window_waits: list[float] = []  # seconds a batch waited for its window after its last message came

    def run(self, handler_module, service, done: threading.Event) -> None:
        context = Context()
        while not done.is_set():
            messages, last_received = self._collect()
            if not messages:
                continue
            self.window_waits.append(time.monotonic() - last_received)
            event = {"Records": [
                {"messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
                 "attributes": {}, "messageAttributes": {}, "md5OfBody": m["MD5OfBody"],
                 "eventSource": "aws:sqs", "eventSourceARN": self._services.queue_arn, "awsRegion": REGION}
                for m in messages
            ]}
            invoked = time.perf_counter()
            response = handler_module.handle(event, context, service)
            self.busy.append(time.perf_counter() - invoked)
            failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                       for i, m in enumerate(messages) if m["MessageId"] not in failed]
            list(self._receivers.map(self._delete, [entries[start : start + RECEIVE_MAX]
                                                    for start in range(0, len(entries), RECEIVE_MAX)]))

    def close(self) -> None:
        self._receivers.shutdown()

    def _collect(self) -> tuple[list[dict], float]:
        """A batch, and when its last message was received."""
        messages, last_received = self._receive(RECEIVE_MAX)
        if not messages:
            return [], last_received
        closes = last_received + self._window
        while len(messages) < self._batch and time.monotonic() < closes:
            wanted = self._batch - len(messages)
            for received, at in self._receivers.map(
                self._receive, [min(RECEIVE_MAX, wanted - start) for start in range(0, wanted, RECEIVE_MAX)]
            ):
                if received:
                    messages += received
                    last_received = max(last_received, at)
        return messages, last_received

    def _receive(self, count: int) -> tuple[list[dict], float]:
        """Up to `count` messages, and when they came."""
        # A 1 s long poll: an empty queue costs moto one wait, not a loop of calls on our cores.
        messages = self._services.sqs.receive_message(
            QueueUrl=self._services.queue_url, MaxNumberOfMessages=count, WaitTimeSeconds=1, VisibilityTimeout=300,
        ).get("Messages", [])
        return messages, time.monotonic()

    def _delete(self, entries: list[dict]) -> None:
        self._services.sqs.delete_message_batch(QueueUrl=self._services.queue_url, Entries=entries)


@dataclass
class Run:
    seconds: float  # first upload -> every image indexed or failed in the catalog
    upload_seconds: float  # first upload -> last upload acknowledged
    handler_seconds: float  # summed over invocations
    invocations: int
    window_wait_seconds: float  # summed over batches: waiting for the window to close with nothing more to receive
    service_cpu: dict[str, float]  # what the local S3/SQS stand-ins took from the same cores
    counts: dict


def end_to_end(services: Services, catalog, handler_module, ingest_services: list, dataset: str,
               images: list[bytes], batch: int, window: float, uploaders: int) -> Run:
    from clipsearch.errors import DatasetNotFound

    done = threading.Event()
    poller = QueuePoller(services, batch, window)
    runners = [threading.Thread(target=poller.run, args=(handler_module, service, done), daemon=True)
               for service in ingest_services]
    cpu_before = service_cpu_seconds()
    started = time.perf_counter()
    uploaded_at: list[float] = []
    for runner in runners:
        runner.start()

    def upload(position: int) -> None:
        services.s3.put_object(Bucket=services.bucket, Key=f"datasets/{dataset}/img-{position:06d}.jpg",
                               Body=images[position], ContentType="image/jpeg")
        uploaded_at.append(time.perf_counter())

    with ThreadPoolExecutor(uploaders, thread_name_prefix="upload") as pool:
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
    poller.close()
    cpu_after = service_cpu_seconds()
    return Run(elapsed, max(uploaded_at) - started, sum(poller.busy), len(poller.busy), sum(poller.window_waits),
               {name: cpu_after[name] - cpu_before[name] for name in cpu_after}, dict(counts))


def default_storage() -> str:
    from clipsearch.local.seaweed import ObjectStorageUnavailable, find_weed

    try:
        find_weed()
    except ObjectStorageUnavailable:
        return "moto"
    return "seaweed"


def main() -> None:
    from clipsearch.local.template import load_template

    template = load_template(REPO / "template.yaml")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=1000, help="photo-sized JPEGs (~1-3 MP)")
    parser.add_argument("--small", type=int, default=10000, help="small 256x256 JPEGs")
    parser.add_argument("--batch", type=int, default=64, help="SQS messages per handler invocation")
    parser.add_argument("--window", type=float, default=template.queue_source.batching_window_seconds,
                        help="batching window in seconds (default: template.yaml's)")
    parser.add_argument("--storage", choices=["seaweed", "moto"], default=default_storage(),
                        help="S3 server of the bucket (default: seaweed when `weed` is installed)")
    parser.add_argument("--uploaders", type=int, default=2, help="upload threads")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="handler instances running at once (Lambda concurrency), sharing one ORT session")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")  # EMF lines on stdout would drown the table

    if not (args.model / "manifest.json").exists():
        sys.exit(f"{args.model} is missing; export it first:\n  {EXPORT_HINT}")
    sources = [path.read_bytes() for path in sorted(SEED_EVAL.glob("*/*.jp*g"))]
    if not sources:
        sys.exit(f"no seed-eval photos under {SEED_EVAL}")

    import importlib.util

    from clipsearch.adapters.postgres_catalog import PostgresCatalog, migrate
    from clipsearch.adapters.postgres_connection import Database
    from clipsearch.adapters.s3_store import S3ObjectStore
    from clipsearch.encoders import OnnxImageEncoder
    from clipsearch.ingest import IngestService
    from clipsearch.local.postgres import start_cluster
    from clipsearch.model_files import ModelFiles

    print(f"generating {args.photos} photo-sized and {args.small} small JPEGs ...", flush=True)
    sets = {"photos": photo_sized(sources, args.photos, 0), "small": small(sources, args.small, 1)}

    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-") as scratch, contextlib.ExitStack() as stack:
        cluster = start_cluster(Path(scratch) / "pg")
        stack.callback(cluster.stop)
        services = start_services(args.storage, Path(scratch), template, stack)
        database = Database(cluster.url)
        stack.callback(database.close)
        migrate(database)
        files = ModelFiles.open(args.model)
        encoder = OnnxImageEncoder.from_model_files(files, threads=args.threads)
        catalog = PostgresCatalog(database)
        ingest_services = []
        for _ in range(args.concurrency):
            handler_database = Database(cluster.url)
            stack.callback(handler_database.close)
            ingest_services.append(IngestService(S3ObjectStore(services.s3, services.bucket),
                                                 PostgresCatalog(handler_database), encoder, files.model_id))
        spec = importlib.util.spec_from_file_location("preprocess_app", REPO / "functions/preprocess/app.py")
        handler = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(handler)
        rows = []
        for name, images in sets.items():
            if not images:
                continue
            model_rate = model_only(encoder, images)
            run = end_to_end(services, catalog, handler, ingest_services, f"bench_{name}", images,
                             args.batch, args.window, args.uploaders)
            segments = catalog.live_segments(catalog.get_dataset(f"bench_{name}").id)
            rows.append((name, len(images), sum(map(len, images)) / len(images) / 1024, model_rate,
                         run, len(segments)))

    print(f"\nmodel {files.model_id}, {args.threads} ORT threads, {args.batch} messages per invocation, "
          f"{args.window:g} s batching window, {args.concurrency} concurrent handler(s), "
          f"{args.uploaders} upload threads, bucket on {args.storage}, {os.cpu_count()} CPUs")
    print(f"{'set':<8}{'images':>8}{'avg KiB':>9}{'model-only img/s':>18}{'end-to-end img/s':>18}"
          f"{'ratio':>7}{'seconds':>9}{'uploads s':>11}{'in handler s':>14}{'handler img/s':>15}{'invocations':>13}"
          f"{'window wait s':>15}{'moto CPU s':>12}{'weed CPU s':>12}{'segments':>10}  statuses")
    for name, count, kib, model_rate, run, segments in rows:
        e2e_rate = count / run.seconds
        print(f"{name:<8}{count:>8}{kib:>9.0f}{model_rate:>18.1f}{e2e_rate:>18.1f}{e2e_rate / model_rate:>7.0%}"
              f"{run.seconds:>9.1f}{run.upload_seconds:>11.1f}{run.handler_seconds:>14.1f}"
              f"{count / run.handler_seconds:>15.1f}{run.invocations:>13}{run.window_wait_seconds:>15.1f}"
              f"{run.service_cpu['moto']:>12.1f}{run.service_cpu['weed']:>12.1f}{segments:>10}  {run.counts}")


if __name__ == "__main__":
    main()
