"""Benchmark opening each tower's onnxruntime session (a cold function pays it) across model directories.

    .venv/bin/python benchmarks/model_open.py --models DIR_A DIR_B [--rounds 7]

Each round opens every (directory, tower) once, in turn, with the function's session settings
(`clipsearch.encoders.create_session`, 2 threads); the graphs are read once first so the page cache holds
them all. Prints the median open time per directory and tower, the ratio of each to the first directory,
and whether the embeddings of a few inputs are identical across directories.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "shared"))

from bench_common import cpu_description  # noqa: E402
from clipsearch.encoders import create_session  # noqa: E402
from clipsearch.model_files import TEXT_GRAPH, VISION_GRAPH  # noqa: E402

TOWERS = {"text": TEXT_GRAPH, "vision": VISION_GRAPH}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, required=True, help="model directories to compare")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (the template's: 2)")
    args = parser.parse_args()

    print(f"CPU: {cpu_description()}")
    sizes = {}
    for directory in args.models:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        sizes[directory] = manifest["image_size"]
        print(f"{directory}: {manifest['model_id']}, graph optimization saved: "
              f"{manifest.get('graph_optimization', 'none')}")
        for graph in TOWERS.values():
            (directory / graph).read_bytes()

    timings: dict[tuple[Path, str], list[float]] = {(d, t): [] for d in args.models for t in TOWERS}
    outputs: dict[tuple[Path, str], np.ndarray] = {}
    for round_number in range(args.rounds):
        for (directory, tower), durations in timings.items():
            started = time.perf_counter()
            session = create_session(directory / TOWERS[tower], args.threads)
            durations.append(time.perf_counter() - started)
            if round_number == 0:
                outputs[directory, tower] = _embed(session, tower, sizes[directory])

    first = args.models[0]
    print(f"\n| model directory | tower | session open median s (of {args.rounds}) | vs {first.name} | "
          f"embeddings identical to {first.name} |")
    print("|---|---|---|---|---|")
    for (directory, tower), durations in timings.items():
        median = statistics.median(durations)
        ratio = median / statistics.median(timings[first, tower])
        same = np.array_equal(outputs[directory, tower], outputs[first, tower])
        print(f"| {directory} | {tower} | {median:.3f} | {ratio:.2f}x | {'yes' if same else 'no'} |")
    return 0


def _embed(session, tower: str, image_size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    if tower == "text":
        ids = np.array([[49406, 320, 1125, 539, 320, 1929, 49407]], dtype=np.int64)
        return session.run(None, {"input_ids": ids})[0]
    pixels = rng.standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    return session.run(None, {"pixel_values": pixels})[0]


if __name__ == "__main__":
    raise SystemExit(main())
