"""Load on a running local stack's HTTP API: N clients for S seconds, optionally while an ingest runs.

Each client keeps one HTTP/1.1 connection and sends queries back to back (text queries, and with
--image-share a share of image queries with a seed-eval photo), reconnecting after a connection
error. Prints the CPU, requests/s, latency p50/p95/p99, the answers by status, the 429/503 answers
that carried Retry-After, and the connection errors by kind (resets, refusals, timeouts).

    .venv/bin/clipsearch local up --model-dir .cache/models/random-vit-b-32-seed0-int8
    .venv/bin/clipsearch ingest ../shared/datasets/seed-eval/train --dataset demo
    .venv/bin/python benchmarks/load.py --dataset demo [--clients 50] [--seconds 60] [--image-share 0.2]
        [--ingest DIR]   # also ingest DIR into the dataset DATASET-ingest while the clients run
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from bench_common import REPO, SEED_EVAL, TEXT_QUERIES, cpu_description

CLI = [str(Path(sys.executable).with_name("clipsearch"))]  # the console script a user runs
REQUEST_TIMEOUT_SECONDS = 60


@dataclass
class Tally:
    """What every client saw, merged under one lock."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    connection_errors: Counter = field(default_factory=Counter)
    throttled_with_retry_after: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    deadline: float = 0.0  # set once, just before the clients are released together
    counting_from: float = 0.0  # answers to requests sent earlier (the warm-up) are not counted


def api_url(home: Path) -> str:
    from clipsearch_tools.local.control import running_state

    state = running_state(home)
    if state is None or not state.api_url:
        raise SystemExit(f"no local stack is running in {home}: run `clipsearch local up` first, or give --api-url")
    return state.api_url


def run_client(url: str, dataset: str, image: bytes | None, image_share: float, client: int, start: threading.Barrier,
               tally: Tally) -> None:
    address = urlsplit(url)
    text_path = f"/datasets/{quote(dataset)}/search/text"
    image_path = f"/datasets/{quote(dataset)}/search/image?k=5"
    start.wait()
    connection: http.client.HTTPConnection | None = None
    sent = 0
    while time.monotonic() < tally.deadline:
        if connection is None:
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=REQUEST_TIMEOUT_SECONDS)
        turn = sent + client  # clients start at different places in the query mix
        as_image = image is not None and int((turn + 1) * image_share) > int(turn * image_share)
        if as_image:
            path, body, content_type = image_path, image, "image/jpeg"
        else:
            query = TEXT_QUERIES[(sent + client) % len(TEXT_QUERIES)]
            path, body, content_type = text_path, json.dumps({"query": query, "k": 5}).encode(), "application/json"
        sent += 1
        started = time.perf_counter()
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as error:
            with tally.lock:
                tally.connection_errors[type(error).__name__] += 1
            connection.close()
            connection = None
            continue
        elapsed_ms = (time.perf_counter() - started) * 1000
        if time.monotonic() - elapsed_ms / 1000 >= tally.counting_from:
            with tally.lock:
                tally.latencies_ms.append(elapsed_ms)
                tally.statuses[response.status] += 1
                if response.status in (429, 503) and response.getheader("retry-after"):
                    tally.throttled_with_retry_after += 1
        if response.will_close:
            connection.close()
            connection = None
    if connection is not None:
        connection.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def start_ingest(folder: Path, dataset: str, home: Path) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "ingest", str(folder), "--dataset", dataset, "--home", str(home), "--json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="an indexed dataset to query")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10,
                        help="seconds of load before the measured ones (new instances start: their first queries are slow)")
    parser.add_argument("--image-share", type=float, default=0.0, help="share of image queries, 0..1")
    parser.add_argument("--image", type=Path, default=SEED_EVAL / "val" / "beach.jpeg")
    parser.add_argument("--ingest", type=Path, help="a folder ingested into DATASET-ingest while the clients run")
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("CLIPSEARCH_HOME") or REPO / ".clipsearch"))
    parser.add_argument("--api-url", help="default: the running local stack's, from --home")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    args = parser.parse_args()
    if not 0 <= args.image_share <= 1:
        parser.error("--image-share is a fraction from 0 to 1")
    url = args.api_url or api_url(args.home.resolve())
    image = args.image.read_bytes() if args.image_share > 0 else None
    ingest = start_ingest(args.ingest, f"{args.dataset}-ingest", args.home.resolve()) if args.ingest else None

    tally = Tally()
    start = threading.Barrier(args.clients + 1)
    clients = []
    for number in range(args.clients):
        clients.append(threading.Thread(target=run_client, daemon=True, args=(
            url, args.dataset, image, args.image_share, number, start, tally)))
    for thread in clients:
        thread.start()
    tally.counting_from = time.monotonic() + args.warmup
    tally.deadline = tally.counting_from + args.seconds
    start.wait()
    for thread in clients:
        thread.join(max(0.0, tally.deadline - time.monotonic()) + REQUEST_TIMEOUT_SECONDS + 10)
    wall = time.monotonic() - tally.counting_from

    ingest_report = None
    if ingest is not None:
        stdout, stderr = ingest.communicate(timeout=3600)
        ingest_report = json.loads(stdout) if stdout.strip() else {"error": stderr.strip()[-500:]}
    latencies = tally.latencies_ms
    summary = {
        "cpu": cpu_description(),
        "api_url": url,
        "clients": args.clients,
        "seconds": round(wall, 1),
        "warmup_seconds": args.warmup,
        "image_share": args.image_share,
        "during_ingest": str(args.ingest) if args.ingest else None,
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / wall, 1),
        "latency_ms": {name: round(percentile(latencies, fraction), 1) if latencies else None
                       for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "latency_mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
        "statuses": {str(status): count for status, count in sorted(tally.statuses.items())},
        "throttled_with_retry_after": tally.throttled_with_retry_after,
        "connection_errors": dict(tally.connection_errors),
        "ingest": ingest_report,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"CPU: {summary['cpu']}")
        print(f"{args.clients} clients for {wall:.1f} s after {args.warmup:g} s of warm-up against {url} "
              f"(image share {args.image_share:g}"
              f"{', during an ingest of ' + str(args.ingest) if args.ingest else ''})")
        print(f"requests: {len(latencies)}, {summary['requests_per_second']} requests/s")
        print("latency ms: " + ", ".join(f"{name} {value}" for name, value in summary["latency_ms"].items())
              + f", mean {summary['latency_mean_ms']}")
        print(f"statuses: {summary['statuses']} (429/503 with Retry-After: {tally.throttled_with_retry_after})")
        print(f"connection errors: {sum(tally.connection_errors.values())} {dict(tally.connection_errors)}")
        if ingest_report is not None:
            print(f"ingest: {json.dumps(ingest_report)[:400]}")
    return 0 if not tally.connection_errors else 1


if __name__ == "__main__":
    socket.setdefaulttimeout(REQUEST_TIMEOUT_SECONDS)
    sys.exit(main())
