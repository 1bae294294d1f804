"""Export a loaded checkpoint into a model directory: graphs, self-check, optional int8, manifest, atomic publish."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.model_files import MODEL_FORMAT
from model_export.checkpoint import Checkpoint
from model_export.errors import ExportError
from model_export.fusion import FUSED_GRAPHS, TowerShape, fuse_attention
from model_export.optimize import optimize_offline, saved_optimization
from model_export.options import QUANTIZATIONS, ExportOptions
from model_export.publish import check_output_dir, checksums, publish, staging_directory
from model_export.quantize import best_quantization
from model_export.samples import CONTEXT_LENGTH, ImageSamples, TextSamples, image_samples, text_samples
from model_export.towers import TEXT_GRAPH, VISION_GRAPH, export_towers
from model_export.verify import SampleEmbeddings, check_onnx_vs_torch, onnx_embeddings, torch_embeddings

log = logging.getLogger(__name__)



def export_model(checkpoint: Checkpoint, options: ExportOptions) -> dict[str, Any]:
    """Write the model directory at `options.out` and return its manifest; on any failure write nothing."""
    if options.quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {options.quantization!r}: choose one of {QUANTIZATIONS}")
    check_output_dir(options.out, options.force)
    with staging_directory(options.out) as staging:
        manifest = _build(checkpoint, options, staging)
        publish(staging, options.out)
    return manifest


def _build(checkpoint: Checkpoint, options: ExportOptions, staging: Path) -> dict[str, Any]:
    quantized = options.quantization == "int8"
    fp32_dir = staging / ".fp32" if quantized else staging
    opset = export_towers(checkpoint.model, fp32_dir, options.opset)
    texts = text_samples(checkpoint.tokenizer_json)
    images = image_samples(checkpoint.preprocess, options.sample_photos)
    # Fused before anything is measured: the parity check below is the fused fp32 graphs' own.
    fusion = _fuse_graphs(checkpoint, fp32_dir, texts, images)
    # fp32 graphs ship as exported here, so they are optimized before their parity is measured; int8 ones
    # are optimized as each candidate is written, and the fp32 reference stays as exported (and fused).
    optimized = () if quantized else _optimize_graphs(fp32_dir)

    log.info("checking ONNX against PyTorch on %d texts and %d images", len(texts.token_ids), len(images.pixel_values))
    fp32 = onnx_embeddings(fp32_dir, texts, images, options.threads)
    parity: dict[str, Any] = {
        "image_samples": images.counts,
        "onnx_vs_torch": check_onnx_vs_torch(torch_embeddings(checkpoint.model, texts, images), fp32),
    }

    weight_type = None
    if quantized:
        weight_type, optimized, parity["int8_vs_fp32"] = _quantize_in_place(
            staging, fp32_dir, fp32, texts, images, options
        )

    (staging / "tokenizer.json").write_text(checkpoint.tokenizer_json, encoding="utf-8")
    (staging / "preprocess.json").write_text(json.dumps(checkpoint.preprocess, indent=2) + "\n", encoding="utf-8")
    manifest = {
        "format": MODEL_FORMAT,
        "model_id": f"{checkpoint.model_id}-int8" if quantized else checkpoint.model_id,
        "source": checkpoint.source,
        "random_weights": checkpoint.random_weights,
        "embedding_dim": int(checkpoint.model.config.projection_dim),
        "context_length": CONTEXT_LENGTH,
        "image_size": checkpoint.preprocess["crop_size"],
        "opset": opset,
        "quantization": options.quantization,
        "quantization_weight_type": weight_type,
        "graph_optimization": {**saved_optimization(), "graphs": list(optimized)},
        "graph_fusion": fusion,
        "files": checksums(staging),
        "parity": parity,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _quantize_in_place(
    staging: Path,
    fp32_dir: Path,
    fp32: SampleEmbeddings,
    texts: TextSamples,
    images: ImageSamples,
    options: ExportOptions,
) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """Replace the fp32 graphs by the best-measured int8 ones; return its weight type, the graphs optimized
    offline and the int8 figures."""
    candidates_dir = staging / ".candidates"
    best, candidates = best_quantization(fp32_dir, candidates_dir, fp32, texts, images, options.threads)
    for graph in (TEXT_GRAPH, VISION_GRAPH):
        (staging / graph).parent.mkdir(parents=True, exist_ok=True)
        (best.directory / graph).rename(staging / graph)
    shutil.rmtree(fp32_dir)
    shutil.rmtree(candidates_dir)
    log.info("chose %s weights", best.weight_type)
    figures = {
        "weight_type": best.weight_type,
        **best.figures,
        "candidates": {candidate.weight_type: candidate.figures for candidate in candidates},
    }
    return best.weight_type, best.optimized_graphs, figures


def _fuse_graphs(
    checkpoint: Checkpoint, directory: Path, texts: TextSamples, images: ImageSamples
) -> dict[str, dict[str, int] | None]:
    """Each graph in FUSED_GRAPHS -> its fused operator counts (None: left unfused, see fusion.fuse_attention)."""
    configs = {TEXT_GRAPH: checkpoint.model.config.text_config, VISION_GRAPH: checkpoint.model.config.vision_config}
    probes = {
        TEXT_GRAPH: [{"input_ids": texts.padded}, *({"input_ids": ids[np.newaxis, :]} for ids in texts.token_ids)],
        VISION_GRAPH: [{"pixel_values": images.pixel_values[:8]}, {"pixel_values": images.pixel_values[:1]}],
    }
    return {
        graph: fuse_attention(directory / graph, TowerShape.of(configs[graph]), probes[graph]) for graph in FUSED_GRAPHS
    }


def _optimize_graphs(directory: Path) -> tuple[str, ...]:
    return tuple(graph for graph in (TEXT_GRAPH, VISION_GRAPH) if optimize_offline(directory / graph))
