"""Dynamic int8 quantization of both towers, with the weight type (QInt8 or QUInt8) chosen by measurement."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from model_export.optimize import optimize_offline
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
    optimized_graphs: tuple[str, ...] = ()

    @property
    def score(self) -> tuple[float, float]:
        # Search quality first (do the neighbour lists survive?), then the worst single embedding.
        worst = min(self.figures["text"]["min_cosine"], self.figures["image"]["min_cosine"])
        return self.figures["image_neighbours"]["mean_overlap"], worst


# Only the transformer's MatMuls. The vision tower's patch-embedding Conv stays fp32: as ConvInteger it took
# 11% of the int8 tower's time (72 of 680 ms per batch of 8, one AVX2 core, onnxruntime profile), as fp32 Conv
# 6% (40 ms). The token embedding is compressed apart (compress_embedding_tables). Random ViT-B/32 vs fp32
# on 110 seed-eval photos: image min cosine 0.999734 -> 0.999751, top-10 neighbour overlap 0.9934 -> 0.9953.
# A fused Attention (model_export.fusion) becomes QAttention: int8 packed QKV weights fed by one quantization
# of the layer's input.
QUANTIZED_OPS = ["MatMul", "Attention"]
# Shape inference cannot type the outputs of onnxruntime's own operators (Attention, QuickGelu), so the
# quantizer is told that every tensor it cannot type is float.
_QUANTIZER_OPTIONS = {"DefaultTensorType": onnx.TensorProto.FLOAT}


def _quantize_towers(fp32_dir: Path, target_dir: Path, weight_type: QuantType) -> tuple[str, ...]:
    """Write both int8 graphs as they will ship (so they are measured as shipped); return those optimized offline."""
    for graph in (TEXT_GRAPH, VISION_GRAPH):
        (target_dir / graph).parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(fp32_dir / graph, target_dir / graph, weight_type=weight_type,
                         op_types_to_quantize=QUANTIZED_OPS, extra_options=_QUANTIZER_OPTIONS)
    compress_embedding_tables(target_dir / TEXT_GRAPH)
    return tuple(graph for graph in (TEXT_GRAPH, VISION_GRAPH) if optimize_offline(target_dir / graph))


# The text tower's token embedding (49,408 x 512 floats) is 101 of its 140 MB after quantize_dynamic, and a
# search function fetches and opens that graph on every cold start. Stored as int8 with one scale per row
# (per token), the graph is 64 MB and opens in half the time (0.83 -> 0.40 s, random ViT-B/32, 2 cores);
# embeddings vs fp32 on 64 random 12-token texts: min cosine 0.998837 (0.998901 without), mean 0.999147
# (0.999140). ORT's own Gather quantization uses one scale for the whole table: min cosine 0.998701.
EMBEDDING_TABLE_MIN_BYTES = 1 << 20


def compress_embedding_tables(graph: Path) -> None:
    """Rewrites every Gather over a float table of >= EMBEDDING_TABLE_MIN_BYTES as a Gather over int8 rows
    and one over their scales, multiplied back to float: the same output shape and type, a quarter of the
    bytes."""
    model = onnx.load(str(graph))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    consumers = Counter(name for node in model.graph.node for name in node.input)
    for node in list(model.graph.node):
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if table is not None and consumers[table.name] != 1:
            log.info("%s: %s is read by %d nodes, left as it is", graph.name, table.name, consumers[table.name])
            continue
        if table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2:
            continue
        values = numpy_helper.to_array(table)
        if values.nbytes < EMBEDDING_TABLE_MIN_BYTES or _gather_axis(node) != 0:
            continue
        scales = np.abs(values).max(axis=1, keepdims=True) / 127.0
        scales[scales == 0] = 1.0
        rows = np.clip(np.round(values / scales), -127, 127).astype(np.int8)
        name, indices, output = node.input[0], node.input[1], node.output[0]
        model.graph.initializer.remove(table)
        model.graph.initializer.extend([
            numpy_helper.from_array(rows, name),
            numpy_helper.from_array(scales.astype(np.float32), f"{name}_row_scales"),
        ])
        node.output[0] = f"{output}_int8"
        position = list(model.graph.node).index(node)
        for offset, added in enumerate([
            helper.make_node("Cast", [f"{output}_int8"], [f"{output}_unscaled"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [f"{name}_row_scales", indices], [f"{output}_row_scales"]),
            helper.make_node("Mul", [f"{output}_unscaled", f"{output}_row_scales"], [output]),
        ]):
            model.graph.node.insert(position + 1 + offset, added)
        log.info("%s: %s stored as int8 rows (%d -> %d bytes)", graph.name, name, values.nbytes, rows.nbytes)
    onnx.checker.check_model(model)
    onnx.save(model, str(graph))


def _gather_axis(node: onnx.NodeProto) -> int:
    return next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 0)


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
        optimized = _quantize_towers(fp32_dir, directory, weight_type)
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
        candidates.append(QuantizedCandidate(weight_type.name, directory, figures, optimized))
    return max(candidates, key=lambda candidate: candidate.score), candidates
