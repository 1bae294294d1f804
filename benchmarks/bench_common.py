"""What the benchmark scripts share: paths, the text queries, and a per-process peak memory reading."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED_EVAL = REPO.parent / "shared" / "datasets" / "seed-eval"
MODELS = REPO / ".cache" / "models"

TEXT_QUERIES = [
    "a photo of a dog",
    "sunset over the beach",
    "a red car parked in front of the eiffel tower",
    "two cats sleeping on a sofa",
    "a bowl of fruit on a wooden table",
    "people playing soccer in a stadium",
    "a ship in a storm",
    "flowers in a garden",
]


def peak_rss_mib() -> float:
    """This process's own peak resident memory.

    Not getrusage's ru_maxrss: Linux carries it across fork and exec, so a child started by a large
    parent would report the parent's peak. VmHWM belongs to the process's own address space.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")
