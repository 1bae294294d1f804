"""Old vs new model directories side by side: text tower latency per query length, image tower throughput.

The graphs are opened the way the functions open them (clipsearch.encoders.create_session: every graph
optimization, denormals flushed, the search function's 50 us spin for the text tower) and timed in alternating
rounds, the order reversed every other round, so a burst of load from other processes hits every model alike.
Each cell is the median wall time and the median CPU time of this process (both threads' work) per run; the
ratio column is new / old. Then a one-thread onnxruntime profile of both text graphs, by operator type.

    .venv/bin/python benchmarks/text_tower.py --old .cache/models/random-vit-b-32-seed0-int8 \\
        --new /tmp/fusion/models/random-vit-b-32-seed0-int8 [--threads 2] [--rounds 7] [--no-vision]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from bench_common import REPO, cpu_description

sys.path.insert(0, str(REPO / "shared"))

from clipsearch.encoders import create_session  # noqa: E402
from clipsearch.model_files import TEXT_GRAPH, VISION_GRAPH  # noqa: E402
from clipsearch.tokenizer import ClipTokenizer  # noqa: E402

# 7, 12 and 15 tokens with the start and end tokens: a short, a typical and a long search query.
QUERIES = (
    "a photo of a dog",
    "a red car parked in front of the eiffel tower",
    "query number 123 about a ship in a storm at night",
)
TEXT_RUNS_PER_ROUND = 40
IMAGE_BATCHES = (1, 8)  # 8 is the ingest function's batch size (encoders.DEFAULT_IMAGE_BATCH_SIZE)
IMAGES_PER_ROUND = 16
SEARCH_SPIN_MICROSECONDS = 500  # config.text_spin_microseconds


def _in_turn(sessions: dict, round_number: int) -> list:
    """The sessions in turn, the order reversed every other round: going first or second must favour neither."""
    order = list(sessions.items())
    return order if round_number % 2 == 0 else order[::-1]


def timed_runs(run, count: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of `count` calls."""
    walls, cpus = [], []
    for _ in range(count):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return walls, cpus


def text_rounds(models: dict[str, Path], threads: int, rounds: int) -> dict[tuple[str, int], tuple[float, float]]:
    tokenizer = ClipTokenizer.from_file(next(iter(models.values())) / "tokenizer.json")
    sessions = {
        label: create_session(directory / TEXT_GRAPH, threads, spin_microseconds=SEARCH_SPIN_MICROSECONDS)
        for label, directory in models.items()
    }
    token_ids = [tokenizer.encode(query).ids[None].astype(np.int64) for query in QUERIES]
    samples: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for ids in token_ids:
        for session in sessions.values():
            for _ in range(10):
                session.run(None, {"input_ids": ids})
    for round_number in range(rounds):
        for ids in token_ids:
            for label, session in _in_turn(sessions, round_number):
                walls, cpus = timed_runs(lambda s=session, i=ids: s.run(None, {"input_ids": i}), TEXT_RUNS_PER_ROUND)
                cell = samples.setdefault((label, ids.shape[1]), ([], []))
                cell[0].extend(walls)
                cell[1].extend(cpus)
    return {key: (statistics.median(w) * 1e3, statistics.median(c) * 1e3) for key, (w, c) in samples.items()}


def text_profile(directory: Path, tokenizer: ClipTokenizer, runs: int = 60) -> tuple[collections.Counter, float]:
    """Kernel milliseconds per run by operator type (onnxruntime profile, one thread, 12-token query)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="text-tower-profile-")) / "profile")
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    session = ort.InferenceSession(str(directory / TEXT_GRAPH), options, providers=["CPUExecutionProvider"])
    ids = tokenizer.encode(QUERIES[1]).ids[None].astype(np.int64)
    for _ in range(runs):
        session.run(None, {"input_ids": ids})
    profile = Path(session.end_profiling())
    per_operator: collections.Counter = collections.Counter()
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_operator[event["args"]["op_name"]] += event["dur"] / runs / 1e3
    profile.unlink()
    profile.parent.rmdir()
    return per_operator, sum(per_operator.values())


def print_profiles(models: dict[str, Path]) -> None:
    tokenizer = ClipTokenizer.from_file(next(iter(models.values())) / "tokenizer.json")
    profiles = {label: text_profile(directory, tokenizer) for label, directory in models.items()}
    print("\ntext tower kernel time by operator, 12 tokens, 1 thread (onnxruntime profile, ms per run)")
    for label, (per_operator, total) in profiles.items():
        top = ", ".join(f"{name} {ms:.2f}" for name, ms in per_operator.most_common(6))
        print(f"{label}: total {total:.2f} ms in {len(per_operator)} operator types; {top}")
    print(f"new/old kernel total: {profiles['new'][1] / profiles['old'][1]:.3f}")


def image_rounds(models: dict[str, Path], threads: int, rounds: int) -> dict[tuple[str, int], tuple[float, float]]:
    sessions = {label: create_session(directory / VISION_GRAPH, threads) for label, directory in models.items()}
    pixels = np.random.default_rng(0).standard_normal((max(IMAGE_BATCHES), 3, 224, 224)).astype(np.float32)
    samples: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for session in sessions.values():
        session.run(None, {"pixel_values": pixels[:1]})
    for round_number in range(rounds):
        for batch in IMAGE_BATCHES:
            for label, session in _in_turn(sessions, round_number):
                walls, cpus = timed_runs(
                    lambda s=session, b=batch: s.run(None, {"pixel_values": pixels[:b]}), IMAGES_PER_ROUND // batch
                )
                cell = samples.setdefault((label, batch), ([], []))
                cell[0].extend(wall / batch for wall in walls)
                cell[1].extend(cpu / batch for cpu in cpus)
    # images/s from the median seconds per image; CPU as CPU-seconds per image turned into images per CPU-second
    return {key: (1 / statistics.median(w), 1 / statistics.median(c)) for key, (w, c) in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, default=REPO / ".cache/models/random-vit-b-32-seed0-int8")
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-vision", action="store_true", help="time the text tower only")
    args = parser.parse_args()
    models = {"old": args.old, "new": args.new}
    print(cpu_description())
    print(f"old: {args.old}\nnew: {args.new}\nthreads {args.threads}, {args.rounds} alternating rounds, "
          f"load average at start {os.getloadavg()[0]:.2f}")

    text = text_rounds(models, args.threads, args.rounds)
    print("\ntext tower, one query  | old wall ms | new wall ms | new/old | old CPU ms | new CPU ms | new/old")
    for length in sorted({length for _, length in text}):
        (old_wall, old_cpu), (new_wall, new_cpu) = text[("old", length)], text[("new", length)]
        print(f"{length:3d} tokens             | {old_wall:11.2f} | {new_wall:11.2f} | {new_wall / old_wall:7.3f} "
              f"| {old_cpu:10.2f} | {new_cpu:10.2f} | {new_cpu / old_cpu:7.3f}")
    print_profiles(models)

    if not args.no_vision:
        image = image_rounds(models, args.threads, max(1, args.rounds // 2))
        print("\nimage tower            | old img/s   | new img/s   | new/old "
              "| old img/CPU-s | new img/CPU-s | new/old")
        for batch in IMAGE_BATCHES:
            (old_rate, old_cpu), (new_rate, new_cpu) = image[("old", batch)], image[("new", batch)]
            print(f"batch {batch:2d}               | {old_rate:11.2f} | {new_rate:11.2f} | {new_rate / old_rate:7.3f} "
                  f"| {old_cpu:13.2f} | {new_cpu:13.2f} | {new_cpu / old_cpu:7.3f}")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
