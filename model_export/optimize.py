"""Offline graph optimization: the shipped graphs already carry onnxruntime's fusions, so a cold function's
session opens without redoing them.

Only the hardware-independent level (ORT_ENABLE_EXTENDED) is saved: the layout transformations of
ORT_ENABLE_ALL may depend on the CPU that ran them, and the functions still apply that level when they open
a session (on an already fused graph it finds little left to do). Measured on the random ViT-B/32 int8
graphs, 2 AVX2 cores: the text session opens in 0.13-0.21 s instead of 0.36-0.47 s, the vision session in
0.4-0.8 s instead of 1.2-1.8 s, with bit-identical embeddings (`benchmarks/model_open.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

# The level saved into the graphs, recorded in the manifest with the onnxruntime version that fused them
# (the fused operators are onnxruntime's own, so the functions must run a version that knows them).
SAVED_LEVEL = "extended"

# A graph with its weights in a side file (over protobuf's 2 GB) is left as exported: onnxruntime would
# have to write the fused weights to a new side file, and such graphs are too large for a function anyway.
_LARGEST_INLINE_GRAPH = 2_000_000_000


def optimize_offline(graph: Path) -> bool:
    """Replace `graph` by its onnxruntime-optimized form (same inputs, outputs and results); False if left as is."""
    if graph.stat().st_size >= _LARGEST_INLINE_GRAPH or any(graph.parent.glob(f"{graph.name}?*")):
        log.info("%s keeps its exported form: its weights live outside the graph file", graph)
        return False
    optimized = graph.with_name(f".optimized-{graph.name}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    before, after = graph.stat().st_size, optimized.stat().st_size
    optimized.replace(graph)
    log.info("%s optimized offline (%.1f -> %.1f MB)", graph, before / 1e6, after / 1e6)
    return True


def saved_optimization() -> dict[str, str]:
    """What the manifest records about the saved optimization."""
    return {"level": SAVED_LEVEL, "onnxruntime": ort.__version__}
