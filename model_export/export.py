"""Export a loaded checkpoint into a model directory: graphs, self-check, optional int8, manifest, atomic publish."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from model_export.checkpoint import Checkpoint
from model_export.errors import ExportError, OutputDirectoryNotEmpty, ParityFailure
from model_export.quantize import best_quantization
from model_export.samples import CONTEXT_LENGTH, image_samples, text_samples
from model_export.towers import TEXT_GRAPH, VISION_GRAPH, export_towers
from model_export.verify import SampleEmbeddings, agreement, onnx_embeddings, torch_embeddings

log = logging.getLogger(__name__)

MODEL_FORMAT = "clipsearch-model/1"
PARITY_THRESHOLD = 0.99999
QUANTIZATIONS = ("none", "int8")


@dataclass(frozen=True)
class ExportOptions:
    out: Path
    quantization: str = "none"
    force: bool = False
    threads: int | None = None
    opset: int | None = None
    sample_photos: Path | None = None


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse early, before any work, to overwrite a directory that holds something."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputDirectoryNotEmpty(str(out))


def export_model(checkpoint: Checkpoint, options: ExportOptions) -> dict[str, Any]:
    """Write the model directory at `options.out` and return its manifest; on any failure write nothing."""
    if options.quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {options.quantization!r}: choose one of {QUANTIZATIONS}")
    check_output_dir(options.out, options.force)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{options.out.name}.partial-", dir=options.out.parent))
    staging.chmod(0o755)
    try:
        manifest = _build(checkpoint, options, staging)
        _publish(staging, options.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("published %s to %s", manifest["model_id"], options.out)
    return manifest


def _build(checkpoint: Checkpoint, options: ExportOptions, staging: Path) -> dict[str, Any]:
    quantized = options.quantization == "int8"
    fp32_dir = staging / ".fp32" if quantized else staging
    opset = export_towers(checkpoint.model, fp32_dir, options.opset)

    texts = text_samples(checkpoint.tokenizer_json)
    images = image_samples(checkpoint.preprocess, options.sample_photos)
    log.info("checking ONNX against PyTorch on %d texts and %d images", len(texts.token_ids), len(images.pixel_values))
    fp32 = onnx_embeddings(fp32_dir, texts, images, options.threads)
    parity: dict[str, Any] = {
        "image_samples": images.counts,
        "onnx_vs_torch": _onnx_vs_torch(torch_embeddings(checkpoint.model, texts, images), fp32),
    }

    model_id = checkpoint.model_id
    weight_type = None
    if quantized:
        best, candidates = best_quantization(fp32_dir, staging / ".candidates", fp32, texts, images, options.threads)
        for graph in (TEXT_GRAPH, VISION_GRAPH):
            (staging / graph).parent.mkdir(parents=True, exist_ok=True)
            (best.directory / graph).rename(staging / graph)
        shutil.rmtree(fp32_dir)
        shutil.rmtree(staging / ".candidates")
        weight_type = best.weight_type
        parity["int8_vs_fp32"] = {
            "weight_type": weight_type,
            **best.figures,
            "candidates": {candidate.weight_type: candidate.figures for candidate in candidates},
        }
        model_id = f"{model_id}-int8"
        log.info("chose %s weights", weight_type)

    (staging / "tokenizer.json").write_text(checkpoint.tokenizer_json, encoding="utf-8")
    (staging / "preprocess.json").write_text(json.dumps(checkpoint.preprocess, indent=2) + "\n", encoding="utf-8")
    manifest = {
        "format": MODEL_FORMAT,
        "model_id": model_id,
        "source": checkpoint.source,
        "random_weights": checkpoint.random_weights,
        "embedding_dim": int(checkpoint.model.config.projection_dim),
        "context_length": CONTEXT_LENGTH,
        "image_size": checkpoint.preprocess["crop_size"],
        "opset": opset,
        "quantization": options.quantization,
        "quantization_weight_type": weight_type,
        "files": _checksums(staging),
        "parity": parity,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _onnx_vs_torch(reference: SampleEmbeddings, exported: SampleEmbeddings) -> dict[str, Any]:
    figures = {
        "threshold": PARITY_THRESHOLD,
        "text": agreement(
            np.concatenate([reference.text, reference.text_padded]),
            np.concatenate([exported.text, exported.text_padded]),
        ),
        "image": agreement(reference.image, exported.image),
        "text_padding_max_abs_diff": float(np.abs(exported.text - exported.text_padded).max()),
    }
    log.info(
        "ONNX vs PyTorch: text min cosine %.8f (max abs diff %.2e), image min cosine %.8f (max abs diff %.2e)",
        figures["text"]["min_cosine"],
        figures["text"]["max_abs_diff"],
        figures["image"]["min_cosine"],
        figures["image"]["max_abs_diff"],
    )
    worst = min(figures["text"]["min_cosine"], figures["image"]["min_cosine"])
    if worst < PARITY_THRESHOLD:
        raise ParityFailure(
            f"ONNX graphs drift from PyTorch: min cosine {worst:.8f} < {PARITY_THRESHOLD} "
            f"(text {figures['text']}, image {figures['image']}); nothing was published"
        )
    return figures


def _checksums(directory: Path) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): _sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _publish(staging: Path, out: Path) -> None:
    # Swap directories by rename so a reader never sees a half-written model directory.
    if out.exists():
        retired = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired)
    else:
        staging.rename(out)
