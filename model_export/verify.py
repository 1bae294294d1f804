"""Measure how closely one set of embeddings follows another: PyTorch vs ONNX, fp32 vs int8."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import CLIPModel

from model_export.errors import ParityFailure
from model_export.samples import ImageSamples, TextSamples
from model_export.towers import TEXT_GRAPH, VISION_GRAPH

log = logging.getLogger(__name__)

IMAGE_BATCH = 16
PARITY_THRESHOLD = 0.99999
NEIGHBOURS = 10


@dataclass(frozen=True)
class SampleEmbeddings:
    """Embeddings of the samples: texts at true length, texts padded, images (rows align with the samples)."""

    text: np.ndarray
    text_padded: np.ndarray
    image: np.ndarray


def torch_embeddings(clip: CLIPModel, texts: TextSamples, images: ImageSamples) -> SampleEmbeddings:
    with torch.inference_mode():
        text = np.concatenate(
            [clip.get_text_features(input_ids=torch.from_numpy(ids[None])).numpy() for ids in texts.token_ids]
        )
        text_padded = clip.get_text_features(input_ids=torch.from_numpy(texts.padded)).numpy()
        image = np.concatenate(
            [
                clip.get_image_features(pixel_values=torch.from_numpy(batch)).numpy()
                for batch in _batches(images.pixel_values)
            ]
        )
    return SampleEmbeddings(text=text, text_padded=text_padded, image=image)


def onnx_embeddings(model_dir: Path, texts: TextSamples, images: ImageSamples, threads: int | None) -> SampleEmbeddings:
    text_session = _session(model_dir / TEXT_GRAPH, threads)
    text = np.concatenate([text_session.run(["text_embeds"], {"input_ids": ids[None]})[0] for ids in texts.token_ids])
    text_padded = text_session.run(["text_embeds"], {"input_ids": texts.padded})[0]
    del text_session
    vision_session = _session(model_dir / VISION_GRAPH, threads)
    image = np.concatenate(
        [vision_session.run(["image_embeds"], {"pixel_values": batch})[0] for batch in _batches(images.pixel_values)]
    )
    return SampleEmbeddings(text=text, text_padded=text_padded, image=image)


def check_onnx_vs_torch(reference: SampleEmbeddings, exported: SampleEmbeddings) -> dict[str, Any]:
    """Agreement of the exported graphs with PyTorch; raise ParityFailure below the threshold."""
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
    if not worst >= PARITY_THRESHOLD:  # NaN fails too
        raise ParityFailure(
            f"ONNX graphs drift from PyTorch: min cosine {worst:.8f} < {PARITY_THRESHOLD} "
            f"(text {figures['text']}, image {figures['image']}); nothing was published"
        )
    return figures


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float | int]:
    """Row-wise cosine (min, mean) and the largest absolute difference between two embedding matrices."""
    cosine = np.sum(_unit(reference) * _unit(candidate), axis=1)
    return {
        "samples": len(reference),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
        "max_abs_diff": float(np.abs(reference - candidate).max()),
    }


def neighbour_overlap(reference: np.ndarray, candidate: np.ndarray, k: int = NEIGHBOURS) -> dict[str, float | int]:
    """Mean and worst share of each vector's k nearest neighbours (by cosine) that both sets agree on."""
    reference_lists = _neighbour_lists(reference, k)
    candidate_lists = _neighbour_lists(candidate, k)
    overlaps = np.array(
        [len(set(ours) & set(theirs)) / k for ours, theirs in zip(reference_lists, candidate_lists, strict=True)]
    )
    return {
        "vectors": len(reference),
        "k": k,
        "mean_overlap": float(overlaps.mean()),
        "min_overlap": float(overlaps.min()),
    }


def _neighbour_lists(vectors: np.ndarray, k: int) -> np.ndarray:
    unit = _unit(vectors)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = vectors.astype(np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _batches(pixel_values: np.ndarray) -> list[np.ndarray]:
    return [pixel_values[start : start + IMAGE_BATCH] for start in range(0, len(pixel_values), IMAGE_BATCH)]


def _session(graph: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
