"""Export a CLIP checkpoint into a clipsearch model directory: two ONNX towers, tokenizer, preprocess, manifest."""

from __future__ import annotations

from model_export.checkpoint import Checkpoint, build_random_checkpoint, load_checkpoint
from model_export.errors import (
    CheckpointNotClip,
    CheckpointUnavailable,
    ExportError,
    OutputDirectoryNotEmpty,
    ParityFailure,
)
from model_export.export import ExportOptions, export_model

__all__ = [
    "Checkpoint",
    "CheckpointNotClip",
    "CheckpointUnavailable",
    "ExportError",
    "ExportOptions",
    "OutputDirectoryNotEmpty",
    "ParityFailure",
    "build_random_checkpoint",
    "export_model",
    "load_checkpoint",
]
