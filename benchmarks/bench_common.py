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


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> str:
    """The CPU model, core count and the SIMD flags that decide int8/fp32 kernel speed (VNNI above all).

    Printed by every benchmark: the same int8 graph ran 2-3x faster on a VNNI machine than on an AVX2-only one.
    """
    import os

    model, flags = "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
    present = [flag for flag in SIMD_FLAGS if flag in flags]
    vnni = "VNNI" if {"avx512_vnni", "avx_vnni"} & flags else "no VNNI"
    return f"{model}, {os.cpu_count()} CPUs, SIMD: {' '.join(present) or 'none'} ({vnni})"
