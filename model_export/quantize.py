"""Dynamic int8 quantization of both towers, with the weight type (QInt8 or QUInt8) chosen by measurement."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import QuantType, quantize_dynamic

from model_export.samples import ImageSamples, TextSamples
from model_export.towers import TEXT_GRAPH, VISION_GRAPH
from model_export.verify import SampleEmbeddings, agreement, neighbour_overlap, onnx_embeddings

log = logging.getLogger(__name__)

WEIGHT_TYPES = (QuantType.QInt8, QuantType.QUInt8)


@dataclass(frozen=True)
class QuantizedCandidate:
    """One weight type's int8 graphs and how well they follow the fp32 graphs."""

    weight_type: str
    directory: Path
    figures: dict[str, Any]

    @property
    def score(self) -> tuple[float, float]:
        # Search quality first (do the neighbour lists survive?), then the worst single embedding.
        worst = min(self.figures["text"]["min_cosine"], self.figures["image"]["min_cosine"])
        return self.figures["image_neighbours"]["mean_overlap"], worst


# Only the transformer's MatMuls. The vision tower's patch-embedding Conv stays fp32: as ConvInteger it took
# 11% of the int8 tower's time (72 of 680 ms per batch of 8, one AVX2 core, onnxruntime profile), as fp32 Conv
# 6% (40 ms); the token embedding Gather stays fp32 too. Random ViT-B/32 vs fp32 on 110 seed-eval photos:
# image min cosine 0.999734 -> 0.999751, top-10 neighbour overlap 0.9934 -> 0.9953.
QUANTIZED_OPS = ["MatMul"]


def _quantize_towers(fp32_dir: Path, target_dir: Path, weight_type: QuantType) -> None:
    for graph in (TEXT_GRAPH, VISION_GRAPH):
        (target_dir / graph).parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(fp32_dir / graph, target_dir / graph, weight_type=weight_type,
                         op_types_to_quantize=QUANTIZED_OPS)


def best_quantization(
    fp32_dir: Path,
    scratch_dir: Path,
    fp32: SampleEmbeddings,
    texts: TextSamples,
    images: ImageSamples,
    threads: int | None,
) -> tuple[QuantizedCandidate, list[QuantizedCandidate]]:
    """Quantize with every weight type, measure each against fp32, return the best and all candidates."""
    candidates = []
    for weight_type in WEIGHT_TYPES:
        directory = scratch_dir / weight_type.name
        log.info("quantizing both towers with %s weights", weight_type.name)
        _quantize_towers(fp32_dir, directory, weight_type)
        quantized = onnx_embeddings(directory, texts, images, threads)
        figures = {
            "text": agreement(
                np.concatenate([fp32.text, fp32.text_padded]), np.concatenate([quantized.text, quantized.text_padded])
            ),
            "image": agreement(fp32.image, quantized.image),
            "image_neighbours": neighbour_overlap(fp32.image, quantized.image),
        }
        log.info(
            "%s vs fp32: text min cosine %.6f, image min cosine %.6f, image overlap@10 %.4f",
            weight_type.name,
            figures["text"]["min_cosine"],
            figures["image"]["min_cosine"],
            figures["image_neighbours"]["mean_overlap"],
        )
        candidates.append(QuantizedCandidate(weight_type.name, directory, figures))
    return max(candidates, key=lambda candidate: candidate.score), candidates
