"""Transformer fusion before quantization: each layer's attention becomes one onnxruntime Attention operator.

onnxruntime's CLIP fusion (onnxruntime.transformers, used here at export time only) rewrites each encoder
layer's Q/K/V projections, head reshapes, scaled scores, causal mask and softmax into one `Attention` node
with packed QKV weights (`unidirectional` for the text tower's causal mask), which quantize_dynamic then
turns into `QAttention`. What that removes is the ~400 small shape operators per run around the text
tower's matrix products (Gather, Reshape, Unsqueeze, Transpose, Concat, Shape, Slice), about a quarter of
its kernel time at search-query lengths. Random ViT-B/32 int8, 12 tokens, one thread, onnxruntime profile
(benchmarks/text_tower.py, loaded machine): new/old kernel time 0.63-0.89; the vision tower gained nothing
at batch 1 and 8 (within the run-to-run noise), so only the text tower is fused (FUSED_GRAPHS).

The fusion also turns residual Add + LayerNormalization into SkipLayerNormalization; onnxruntime's CPU
kernel for it was 3-5x slower than the Add and LayerNormalization it replaces (vision tower, batch 8,
per-operator profile), so those are split back (`split_skip_layer_norms`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from clipsearch.model_files import TEXT_GRAPH
from model_export.verify import agreement

log = logging.getLogger(__name__)

FUSED_GRAPHS = (TEXT_GRAPH,)
FUSED_OPERATORS = ("Attention", "QuickGelu", "LayerNormalization", "SkipLayerNormalization")


@dataclass(frozen=True)
class TowerShape:
    """What the fusion must find in a tower: one attention per layer with this many heads over this width."""

    layers: int
    heads: int
    hidden_size: int

    @classmethod
    def of(cls, tower_config: Any) -> TowerShape:
        """From a transformers CLIPTextConfig or CLIPVisionConfig."""
        return cls(tower_config.num_hidden_layers, tower_config.num_attention_heads, tower_config.hidden_size)


# Fused vs as-exported fp32 graph on the probe inputs, worst row cosine: 1.000000000 to 9 digits on the
# random ViT-B/32 text tower (max abs diff 2-3e-6). A wrong head count (8 instead of 12 in the vision tower)
# gave 0.9999953, which the 0.99999 parity check against PyTorch would still have let through on random
# weights, so the fusion checks itself.
FUSED_MIN_COSINE = 0.9999999


def fuse_attention(
    graph: Path, shape: TowerShape, probes: Sequence[dict[str, np.ndarray]]
) -> dict[str, int] | None:
    """Rewrite `graph` in place with one Attention node per layer; return the fused operator counts, or None
    (graph left as exported) when the fusion does not find exactly one attention of `shape.heads` per layer
    or the fused graph's outputs on any of `probes` (give the shapes it will run at: a padded batch, and single
    texts at their true length) drift from the exported graph's (FUSED_MIN_COSINE; NaN counts as drift)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    # opt_level=0: only the Python pattern fusions; onnxruntime's own graph optimizations run later
    # (optimize.optimize_offline), after quantization.
    fused = optimize_model(
        str(graph),
        model_type="clip",
        num_heads=shape.heads,
        hidden_size=shape.hidden_size,
        opt_level=0,
        optimization_options=FusionOptions("clip"),
    )
    attentions = [node for node in fused.model.graph.node if node.op_type == "Attention"]
    heads = {_attribute(node, "num_heads") for node in attentions}
    if len(attentions) != shape.layers or heads != {shape.heads}:
        log.warning(
            "%s: the attention fusion found %d Attention nodes with heads %s, expected %d with %d heads; "
            "the graph stays unfused",
            graph, len(attentions), sorted(heads), shape.layers, shape.heads,
        )
        return None
    split = split_skip_layer_norms(fused.model)
    candidate = graph.with_name(f".fused-{graph.name}")
    fused.save_model_to_file(str(candidate))  # also declares the com.microsoft operator domain
    worst = min(agreement(_outputs(graph, probe), _outputs(candidate, probe))["min_cosine"] for probe in probes)
    if not worst >= FUSED_MIN_COSINE:
        candidate.unlink()
        log.warning("%s: the fused graph drifts from the exported one (min cosine %.9f), left unfused", graph, worst)
        return None
    candidate.replace(graph)
    counts = Counter(node.op_type for node in fused.model.graph.node)
    log.info(
        "%s: %d attention layers fused (%d SkipLayerNormalization split back), min cosine vs exported %.9f",
        graph, len(attentions), split, worst,
    )
    return {operator: counts[operator] for operator in FUSED_OPERATORS}


def split_skip_layer_norms(model: onnx.ModelProto) -> int:
    """Replace every SkipLayerNormalization by [bias Add,] residual Add and LayerNormalization, in place; the
    residual sum keeps the name of the node's fourth output when a later layer reads it. Returns the count."""
    graph = model.graph
    split = 0
    for node in list(graph.node):
        if node.op_type != "SkipLayerNormalization":
            continue
        if any(output for output in node.output[1:3]):
            raise ValueError(f"{node.name}: its mean / inverse-deviation outputs are read, cannot split it")
        residual = node.output[3] if len(node.output) > 3 and node.output[3] else f"{node.name}_residual"
        replacement = []
        first = node.input[0]
        if len(node.input) > 4 and node.input[4]:
            first = f"{node.name}_biased"
            replacement.append(
                helper.make_node("Add", [node.input[0], node.input[4]], [first], name=f"{node.name}_bias")
            )
        replacement.append(helper.make_node("Add", [first, node.input[1]], [residual], name=f"{node.name}_add"))
        replacement.append(
            helper.make_node(
                "LayerNormalization",
                [residual, node.input[2], *node.input[3:4]],
                [node.output[0]],
                name=f"{node.name}_norm",
                axis=-1,
                epsilon=_attribute(node, "epsilon", 1e-5),
            )
        )
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, added in enumerate(replacement):
            graph.node.insert(position + offset, added)
        split += 1
    return split


def _outputs(graph: Path, probe: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return session.run(None, probe)[0]


def _attribute(node: onnx.NodeProto, name: str, default: float | int | None = None) -> float | int | None:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
